"""`python -m sslocal.main --config configs/X.py --workdir DIR`: the same as `sslocal train`."""

import sys

from sslocal import cli

if __name__ == "__main__":
    cli.run([sys.argv[0], "train", *sys.argv[1:]])
