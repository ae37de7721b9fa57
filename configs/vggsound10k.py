"""marginNCE trained on VGGSound-10k, tested on VGG-SS.

    sslocal train --config configs/vggsound10k.py --workdir runs/vggsound10k

Differs from default.py in: train_dataset.
The paper reports no 10k row for marginNCE; EZ-VSL's
10k numbers are the reference point for this subset.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.train_dataset = "vggsound/10k"
    return config
