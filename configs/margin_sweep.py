"""Table 6, the margin sweep on VGGSound-144k -> VGG-SS: one run per margin.

    for m in 0.2 0.0 -0.1 -0.2 -0.3 -0.4; do
      sslocal train --config configs/margin_sweep.py --config.margin=$m --workdir runs/margin_$m
    done

Differs from default.py in: nothing (the margin is given on the command line).
Paper cIoU (x100): +0.2 37.05, 0.0 36.93, -0.1 37.51, -0.2 38.25, -0.3 37.65, -0.4 36.93.
"""

from configs import default


def get_config():
    return default.get_config()
