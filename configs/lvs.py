"""The LVS baseline (trimap loss with a hard negative), margin 0; Table 5 adds the margin:

    sslocal train --config configs/lvs.py --workdir runs/lvs
    sslocal train --config configs/lvs.py --config.margin=-0.2 --workdir runs/lvs_margin

Differs from default.py in: loss, margin.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.loss = "lvs"
    config.margin = 0.0
    return config
