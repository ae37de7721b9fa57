"""Loads a training workdir's best model on a single device (tests/test_e2e.py).

argv: workdir. Prints "LOADED <what>" and the device count.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    import jax
    import ml_collections
    from flax import nnx

    from sslocal import checkpointing
    from sslocal.models import factory

    model_config = ml_collections.ConfigDict(checkpointing.read_model_config(sys.argv[1]))
    _, params, stats = nnx.split(factory.build_model(model_config), nnx.Param, nnx.BatchStat)
    what = checkpointing.load_model_variables(sys.argv[1], params, stats)[2]
    print("LOADED", what, "DEVICES", jax.device_count())


if __name__ == "__main__":
    main()
