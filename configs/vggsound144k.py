"""marginNCE trained on VGGSound-144k, tested on VGG-SS and SoundNet-Flickr (the paper's Table 1-2).

    sslocal prepare --dataset vggsound/144k --root /data/vggsound
    sslocal prepare --dataset vggss/test --root /data/vggss
    sslocal prepare --dataset flickr_soundnet/test --root /data/flickr
    sslocal train --config configs/vggsound144k.py --workdir runs/vggsound144k

Differs from default.py in: test_datasets.
Paper (x100, best epoch): VGG-SS cIoU 38.25 AUC 39.06 (+OGL 39.78 / 40.01);
Flickr cIoU 83.94 AUC 63.20 (+OGL 85.14 / 64.55).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.test_datasets = ("vggss/test", "flickr_soundnet/test")
    return config
