"""The EZ-VSL baseline (multiple-instance max over positions, symmetric), margin 0; Table 5:

    sslocal train --config configs/ezvsl.py --workdir runs/ezvsl
    sslocal train --config configs/ezvsl.py --config.margin=-0.2 --workdir runs/ezvsl_margin

Differs from default.py in: loss, margin, tau.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.loss = "ezvsl"
    config.margin = 0.0
    config.tau = 0.03
    return config
