"""Builds a synthetic_av preset with a chosen number of training scenes (benchmarks only).

    python benchmarks/build_synthetic.py DATA_DIR [NUM_TRAIN] [PRESET]

e.g. a 512-scene synthetic_av/full (the paper's 224 px frames) for the input benchmark, far
quicker to build than the preset's 10,000 scenes.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sslocal.data import builders  # noqa: E402

if __name__ == "__main__":  # the builder spawns worker processes that re-import this file
    data_dir = sys.argv[1]
    num_train = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    preset = sys.argv[3] if len(sys.argv) > 3 else "full"
    builder = builders.get_builder(f"synthetic_av/{preset}", data_dir=data_dir,
                                   num_train=num_train, num_test=16)
    if builder.is_prepared():
        print(f"synthetic_av/{preset} already prepared in {data_dir}")
    else:
        start = time.perf_counter()
        builder.download_and_prepare()
        print(f"built synthetic_av/{preset} ({num_train} train scenes) in "
              f"{time.perf_counter() - start:.0f} s")
