"""marginNCE trained on SoundNet-Flickr-10k, tested on SoundNet-Flickr.

    sslocal train --config configs/flickr10k.py --workdir runs/flickr10k

Differs from default.py in: train_dataset, test_datasets.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.train_dataset = "flickr_soundnet/10k"
    config.test_datasets = ("flickr_soundnet/test",)
    return config
