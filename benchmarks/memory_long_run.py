"""Host memory of a long tiny training run: the resident set must stay flat after warm-up.

    python benchmarks/memory_long_run.py [--steps 2000] [--num_train 512] [--trim]

Trains synthetic_av/tiny (width 8, D 16, 64 px, batch 8; --num_train scenes, 512 by default:
64 steps an epoch) through train_and_evaluate with everything a real run does: Grain loading,
a checkpoint (model, optimizer, data-iterator state) at every epoch end and every 100 steps,
metrics every 50 steps, an evaluation and best-checkpoint update every 2 epochs. This
process's resident set size is read from /proc/self/statm (Linux) every 20 steps, with its
anonymous and file-backed parts, the C heap in use (glibc) and the Python object count (a table
of every 100th reading). Compares the median RSS over steps 200-400 with the median over the last
200 steps, and fits the trend; exits with status 1 when the growth is 5% or more.
`--num_train 64` saves every 8 steps (a stress test of checkpointing: 250 saves).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ and sslocal/

from configs import tiny  # noqa: E402
from sslocal import host_memory, train  # noqa: E402
from sslocal.data import builders  # noqa: E402

SAMPLE_EVERY = 20
BASELINE_STEP = 200
WINDOW = 200  # steps
PRINT_EVERY = 100


def rss_bytes() -> int:
    """This process's resident set size now (not the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_parts() -> dict[str, int]:
    """RssAnon (heap, stacks, anonymous maps) and RssFile (mapped files) in bytes."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                parts[key] = int(value.split()[0]) * 1024
    return parts


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def malloc_in_use() -> int | None:
    """Bytes the C heap (glibc malloc: arenas + mmapped blocks) holds allocated now; None
    without glibc >= 2.33. RSS growing while this stays flat is allocator fragmentation, not
    a leak."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def record_rss(samples: dict[int, int], heap: dict[int, int | None],
               objects: dict[int, int], parts: dict[int, dict[str, int]],
               trim: bool = False) -> None:
    """Wraps the train step so that every SAMPLE_EVERY-th call records the RSS, the C heap in
    use and the number of Python objects the garbage collector tracks."""
    make_train_step = train.make_train_step

    def make(*args, **kwargs):
        step_fn = make_train_step(*args, **kwargs)
        calls = [0]

        def step(state, batch):
            out = step_fn(state, batch)
            calls[0] += 1
            if calls[0] % SAMPLE_EVERY == 0:
                if trim:
                    host_memory.release_free_memory()
                samples[calls[0]] = rss_bytes()
                parts[calls[0]] = rss_parts()
                heap[calls[0]] = malloc_in_use()
                objects[calls[0]] = len(gc.get_objects())
            return out

        return step

    train.make_train_step = make


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_train", type=int, default=512, help="training scenes")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--data_dir", default=None, help="default: a temporary directory")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory "
                        "(must not hold a run: the steps are counted from 0)")
    parser.add_argument("--limit", type=float, default=5.0, help="allowed growth, percent")
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) before each "
                        "reading (diagnosis: growth that disappears is freed memory the "
                        "allocator kept, not a leak)")
    args = parser.parse_args()
    if args.steps < BASELINE_STEP + 2 * WINDOW:
        parser.error(f"--steps must be at least {BASELINE_STEP + 2 * WINDOW}")

    with tempfile.TemporaryDirectory(prefix="sslocal_memory_") as tmp:
        config = tiny.get_config()
        config.data_dir = args.data_dir or os.path.join(tmp, "data")
        builder = builders.get_builder("synthetic_av/tiny", data_dir=config.data_dir,
                                       num_train=args.num_train, num_test=16)
        if not builder.is_prepared():
            builder.download_and_prepare()
        config.image_size = args.image_size
        config.model.width = args.width
        config.batch_size = config.eval_batch_size = args.batch_size
        steps_per_epoch = builder.info.splits["train"].num_examples // args.batch_size
        config.num_epochs = math.ceil(args.steps / steps_per_epoch)
        config.max_steps = args.steps
        config.log_every_steps = 50
        config.checkpoint_every_steps = 100
        config.eval_every_epochs = 2
        samples: dict[int, int] = {}
        heap: dict[int, int | None] = {}
        objects: dict[int, int] = {}
        parts: dict[int, dict[str, int]] = {}
        record_rss(samples, heap, objects, parts, trim=args.trim)
        start = time.perf_counter()
        train.train_and_evaluate(config, args.workdir or os.path.join(tmp, "work"))
        seconds = time.perf_counter() - start

    mib = 2.0**20
    print(f"\n{'step':>6} {'RSS MiB':>9} {'anon MiB':>9} {'file MiB':>9} {'malloc MiB':>11} "
          f"{'objects':>9}")
    for step, rss in sorted(samples.items()):
        if step % PRINT_EVERY:
            continue
        in_use = "n/a" if heap[step] is None else f"{heap[step] / mib:.1f}"
        anon, file = (f"{parts[step].get(k, 0) / mib:.1f}" for k in ("RssAnon", "RssFile"))
        print(f"{step:>6} {rss / mib:>9.1f} {anon:>9} {file:>9} {in_use:>11} "
              f"{objects[step]:>9}")
    # One reading sits anywhere between two evaluations' and saves' transient buffers (+-40 MiB
    # untrimmed), so compare the median of the readings in the window after warm-up with the
    # median of the last window, and fit a line through all of them.
    last_step = max(samples)
    first = [samples[s] for s in samples if BASELINE_STEP <= s <= BASELINE_STEP + WINDOW]
    final = [samples[s] for s in samples if s > last_step - WINDOW]
    base, end = float(np.median(first)), float(np.median(final))
    growth = 100.0 * (end - base) / base
    later = sorted(s for s in samples if s >= BASELINE_STEP)
    slope = np.polyfit(later, [samples[s] / mib for s in later], 1)[0] * 1000
    peak_growth = 100.0 * (max(samples[s] for s in later) - max(first)) / max(first)
    ok = growth < args.limit
    print(f"\n{args.steps} steps in {seconds:.0f} s; median RSS over steps {BASELINE_STEP}-"
          f"{BASELINE_STEP + WINDOW}: {base / mib:.1f} MiB, over the last {WINDOW} steps: "
          f"{end / mib:.1f} MiB; growth {growth:+.2f}% (limit {args.limit:.0f}%): "
          f"{'OK' if ok else 'TOO MUCH'}; trend {slope:+.1f} MiB per 1000 steps; highest "
          f"reading after step {BASELINE_STEP + WINDOW} vs highest before: {peak_growth:+.2f}%")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
