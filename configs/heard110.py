"""Open-set: marginNCE trained on the 110 "heard" VGGSound classes, tested on heard and unheard.

    sslocal train --config configs/heard110.py --workdir runs/heard110

Differs from default.py in: train_dataset, test_datasets.
Paper (x100): heard cIoU 36.35 AUC 37.92; unheard cIoU 37.90 AUC 39.17.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.train_dataset = "vggsound/heard110"
    config.test_datasets = ("vggss/heard_test", "vggss/unheard_test")
    return config
