"""SoundNet-Flickr: the 10k / 144k training lists (or every clip on disk) and the test set."""

from __future__ import annotations

import os

from sslocal.data import annotations
from sslocal.data.builders import _clips
from sslocal.data.builders.base import AVBuilder, AVConfig, train_jobs


class FlickrSoundnet(AVBuilder):
    """SoundNet-Flickr clips; test boxes from ROOT/Annotations/<id>.xml (fmt "flickr")."""

    name = "flickr_soundnet"
    GT_FORMAT = "flickr"
    BUILDER_CONFIGS = [
        AVConfig(name="full", split_list=None, description="every Flickr clip on disk"),
        AVConfig(name="10k", split_list="flickr_10k", description="Flickr 10k subset"),
        AVConfig(name="144k", split_list="flickr_144k", description="Flickr 144k subset"),
        AVConfig(name="10k_minus_test", split_list="flickr_10k", exclude_test_clips=True,
                 description="Flickr 10k subset without the shipped test lists' clips"),
        AVConfig(name="144k_minus_test", split_list="flickr_144k", exclude_test_clips=True,
                 description="Flickr 144k subset without the shipped test lists' clips"),
        AVConfig(name="test", split_list="flickr_test", test=True,
                 description="the 249 annotated test clips"),
        AVConfig(name="test_plus_silent", split_list="flickr_test", test=True,
                 plus_silent="flickr_test_plus_silent",
                 description="test clips plus non-sounding pairs (extended evaluation)"),
    ]

    def _jobs(self, root):
        config = self.builder_config
        if not config.test:
            return {"train": train_jobs(root, config.split_list, self._ids, config.image_size,
                                        config.exclude_test_clips)}
        ids = self._ids if self._ids is not None else annotations.read_split(config.split_list)
        jobs = [_clips.make_job(i, root, image_size=config.image_size, test=True, sounding=True,
                                xml=os.path.join(root, "Annotations", f"{i}.xml"))
                for i in ids]
        return {"test": jobs + self._plus_silent_jobs(root)}
