#!/usr/bin/env bash
# One-shot train-step benchmark for a GPU (or TPU) machine, at the paper's size (width 64,
# D 512, 224 x 224 frames, 257 x 200 spectrograms, marginNCE + Adam):
#   1. bfloat16 and float32 towers, global batch 128 and 256        (4 runs, the results)
#   2. bfloat16 / 256 again under a few XLA flags worth measuring  (FLAG_VARIANTS=0 skips)
# Each run is `python -m sslocal benchmark step` in its own process (XLA_FLAGS are read once).
# Writes to $OUT (the device tool's folder; else benchmarks/results/<time>) at most 4 files:
# summary.json (every run's JSON), summary.txt (the table), gpu_step.log (all output) and
# hlo_bf16_128.txt.gz (the optimised step of the first run). The table is printed last.
#
#   device: bash benchmarks/fetch_wheels.sh   (here, once: .whl/ with what the image lacks)
#           run(command="bash benchmarks/gpu_step.sh", carry=[".whl"], timeout_s=600)
#   CPU check of this script (tiny sizes, 1 device, ~5 minutes on 2 busy cores):
#           SMALL=1 bash benchmarks/gpu_step.sh
#
# DEADLINE_S (default 420): no run starts after that many seconds, so the summary always
# comes back inside one 10-minute device call. RUN_TIMEOUT (default 300) caps one run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/results/$(date +%Y%m%d-%H%M%S)}
DEADLINE_S=${DEADLINE_S:-420}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
FLAG_VARIANTS=${FLAG_VARIANTS:-1}
WORK=$(mktemp -d /tmp/sslocal_gpu_step.XXXXXX)
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_step.log"
: >"$LOG"
say() { echo "$@" | tee -a "$LOG"; }

if [[ "${SMALL:-0}" == 1 ]]; then  # a CPU check of the script itself
  SIZE=(--config.model.width=8 --config.model.embed_dim=16 --config.image_size=64)
  BATCHES=(8 16)
  export SSLOCAL_BENCH_DEVICES=${SSLOCAL_BENCH_DEVICES:-1}
else
  SIZE=()
  BATCHES=(128 256)
fi

# -- preflight: the interpreter, the accelerator, the imports (wheels from .whl if needed) ----
say "== $(date -u +%FT%TZ) $(hostname) python=$PYTHON"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
if ! $PYTHON -c "import sslocal.cli, sslocal.benchmark, configs.default" >>"$LOG" 2>&1; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    say "installing the carried wheels (--no-deps) into $WORK/site"
    $PYTHON -m pip install -q --no-deps --no-index --target "$WORK/site" .whl/*.whl >>"$LOG" 2>&1
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
if ! $PYTHON - >>"$LOG" 2>&1 <<'EOF'
import importlib.metadata as md
import jax
import sslocal.benchmark, sslocal.cli  # noqa: F401
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
print("devices:", jax.devices())
EOF
then
  say "preflight failed: sslocal.benchmark does not import (see the end of $LOG)"
  tail -20 "$LOG"
  exit 1
fi
tail -7 "$LOG"

# -- the runs ---------------------------------------------------------------------------------
start=$SECONDS
run() {  # name, extra XLA flags, config overrides...
  local name=$1 flags=$2
  shift 2
  if (( SECONDS - start > DEADLINE_S )); then
    say "skip $name: past DEADLINE_S=$DEADLINE_S"
    return
  fi
  local xla t0=$SECONDS
  # shellcheck disable=SC2116,SC2086  # echo squeezes blanks: XLA reads a blank XLA_FLAGS as a file name
  xla=$(echo ${XLA_FLAGS:-} $flags)
  say "== $name XLA_FLAGS='$xla' $*"
  (
    if [[ -n "$xla" ]]; then export XLA_FLAGS="$xla"; else unset XLA_FLAGS; fi
    exec timeout "$RUN_TIMEOUT" "$PYTHON" -m sslocal benchmark step \
      --config configs/default.py "${SIZE[@]}" "$@" --out "$WORK/$name.json"
  ) >>"$LOG" 2>&1
  say "   $name: exit $? after $(( SECONDS - t0 )) s"
}

first=1
for dtype in bfloat16 float32; do
  for batch in "${BATCHES[@]}"; do
    if (( first )); then export SSLOCAL_BENCH_HLO_DIR="$WORK/hlo"; fi
    run "${dtype}_${batch}" "" --config.model.dtype="$dtype" --config.batch_size="$batch"
    unset SSLOCAL_BENCH_HLO_DIR
    first=0
  done
done

if [[ "$FLAG_VARIANTS" == 1 ]]; then
  big=${BATCHES[-1]}
  # name|flags: each is compared with bfloat16_$big above (same process layout, same card).
  for variant in \
      "lhs|--xla_gpu_enable_latency_hiding_scheduler=true" \
      "no_cmdbuf|--xla_gpu_enable_command_buffer=" \
      "autotune0|--xla_gpu_autotune_level=0"; do
    run "bfloat16_${big}_${variant%%|*}" "${variant#*|}" \
      --config.model.dtype=bfloat16 --config.batch_size="$big"
  done
fi

# -- summary: at most 4 files back --------------------------------------------------------------
shopt -s nullglob
hlo=("$WORK"/hlo/*.txt)
(( ${#hlo[@]} )) && gzip -c "${hlo[0]}" >"$OUT_DIR/hlo_bf16_${BATCHES[0]}.txt.gz"
$PYTHON - "$WORK" "$OUT_DIR" <<'EOF'
import json, pathlib, sys
work, out = map(pathlib.Path, sys.argv[1:])
runs = {p.stem: json.loads(p.read_text())  # in the order they ran
        for p in sorted(work.glob("*.json"), key=lambda p: p.stat().st_mtime)}
(out / "summary.json").write_text(json.dumps(runs, indent=2) + "\n")
head = (f"{'run':<26} {'device':<22} {'step ms':>8} {'p90 ms':>7} {'pipe ms':>8} "
        f"{'samples/s':>10} {'TFLOP/s':>8} {'peak %':>6} {'compile s':>9} {'peak GiB':>8}")
lines = [head, "-" * len(head)]
for name, r in runs.items():
    peak = r.get("peak_fraction")
    mem = r.get("peak_bytes_in_use")
    lines.append(
        f"{name:<26} {r['device_kind'][:22]:<22} {1e3 * r['step_time_median_s']:8.2f} "
        f"{1e3 * r['step_time_p90_s']:7.2f} {1e3 * r['step_time_pipelined_s']:8.2f} "
        f"{r['samples_per_second']:10.1f} {r['achieved_tflops']:8.2f} "
        f"{'-' if peak is None else f'{100 * peak:.1f}':>6} {r['compile_seconds']:9.1f} "
        f"{'-' if mem is None else f'{mem / 2**30:.1f}':>8}")
lines.append(f"model FLOPs per sample (train step): "
             f"{next(iter(runs.values()))['flops_per_sample'] / 1e9:.2f} G" if runs else "no runs")
(out / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
rm -rf "$WORK"
