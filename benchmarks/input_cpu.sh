#!/usr/bin/env bash
# The Grain training loader alone at the paper's frame size: builds a 512-scene synthetic_av/full
# (224 x 224 crops of 246-px JPEG frames, 257 x 200 float16 spectrograms) once into DATA_DIR,
# then runs `sslocal benchmark input` (4 threads at most) and the loader with 1 and 2 threads.
# The per-core figure is samples per CPU-second of the process.
#   bash benchmarks/input_cpu.sh            # DATA_DIR=/tmp/sslocal_input_data, NUM_TRAIN=512
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DATA_DIR=${DATA_DIR:-/tmp/sslocal_input_data}
NUM_TRAIN=${NUM_TRAIN:-512}
OUT=${OUT:-/tmp/sslocal_input}
mkdir -p "$OUT"
$PYTHON benchmarks/build_synthetic.py "$DATA_DIR" "$NUM_TRAIN" full
ARGS=(--config configs/default.py --config.data_dir="$DATA_DIR" --dataset synthetic_av/full
      --config.batch_size=128)
$PYTHON -m sslocal benchmark input "${ARGS[@]}" --out "$OUT/input.json" 2>&1 | grep -v "^I[0-9]"
$PYTHON - "$DATA_DIR" "$OUT" <<'PY'
import json, sys
from configs import default
from sslocal import benchmark

config = default.get_config()
config.data_dir, config.batch_size = sys.argv[1], 128
for threads in (1, 2):
    r = benchmark.benchmark_input(config, "synthetic_av/full", num_threads=threads)
    with open(f"{sys.argv[2]}/input_{threads}threads.json", "w") as f:
        json.dump(r, f, indent=2)
    print(f"{threads} thread(s): {r['samples_per_second']:.0f} samples/s wall, "
          f"{r['samples_per_cpu_second']:.0f} per CPU-second")
PY
