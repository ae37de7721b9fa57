#!/usr/bin/env bash
# The same global batch on 1 and on 8 fake CPU devices: per-step times side by side, and the
# collectives XLA put into the 8-device step (an all-gather of activations, or any collective
# beyond BatchNorm statistics, gradients and the B x D audio embeddings, would show up here).
#   bash benchmarks/scaling_cpu.sh [extra --config.* overrides]
# OUT (default /tmp/sslocal_scaling) receives step_1dev.json, step_8dev.json and the HLO.
# On a shared 2-core machine the times are noisy: compare ratios, not absolute numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-/tmp/sslocal_scaling}
mkdir -p "$OUT"
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
export SSLOCAL_BENCH_HLO_DIR="$OUT/hlo"
ARGS=(--config configs/synthetic.py --config.model.width=16 --config.model.embed_dim=32
      --config.image_size=64 --config.batch_size=32 "$@")
for n in 1 8; do
  SSLOCAL_BENCH_DEVICES=$n $PYTHON -m sslocal benchmark step "${ARGS[@]}" \
    --out "$OUT/step_${n}dev.json" >"$OUT/step_${n}dev.log" 2>&1
done
$PYTHON - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
r1, r8 = (json.loads((out / f"step_{n}dev.json").read_text()) for n in (1, 8))
print(f"{'devices':>7} {'median s':>9} {'p10 s':>7} {'p90 s':>7} {'pipelined s':>11} "
      f"{'samples/s':>9} {'compile s':>9} {'traces':>6}")
for r in (r1, r8):
    print(f"{r['num_devices']:>7} {r['step_time_median_s']:9.3f} {r['step_time_p10_s']:7.3f} "
          f"{r['step_time_p90_s']:7.3f} {r['step_time_pipelined_s']:11.3f} "
          f"{r['samples_per_second']:9.1f} {r['compile_seconds']:9.1f} {r['traces']:>6}")
print(f"8 / 1 device step time: median {r8['step_time_median_s'] / r1['step_time_median_s']:.2f}"
      f", pipelined {r8['step_time_pipelined_s'] / r1['step_time_pipelined_s']:.2f}")
print("8-device collectives:", r8["collectives"])
print("8-device all-gathers:", r8["all_gather_shapes"])
print("1-device collectives:", r1["collectives"])
EOF
