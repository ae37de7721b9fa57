"""Loads a training workdir's best model on a single device (tests/test_e2e.py).

argv: workdir. Prints "LOADED <what>" and the device count.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    import jax

    from sslocal.models import load

    print("LOADED", load.load_model(sys.argv[1]).description, "DEVICES", jax.device_count())


if __name__ == "__main__":
    main()
