"""marginNCE trained on SoundNet-Flickr-144k, tested on SoundNet-Flickr and VGG-SS.

    sslocal prepare --dataset flickr_soundnet/144k --root /data/flickr
    sslocal train --config configs/flickr144k.py --workdir runs/flickr144k

Differs from default.py in: train_dataset, test_datasets.
(Flickr is the first test set: it picks the best epoch.)
Paper (x100): Flickr cIoU 84.74 AUC 63.08 (+OGL 85.54 / 64.27); VGG-SS cIoU 34.45 AUC 37.35.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.train_dataset = "flickr_soundnet/144k"
    config.test_datasets = ("flickr_soundnet/test", "vggss/test")
    return config
