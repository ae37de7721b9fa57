"""VGG-SS test sets: VGG-SS, heard / unheard-110, and the extended plus_silent set."""

from __future__ import annotations

from sslocal.data import annotations
from sslocal.data.builders import _clips
from sslocal.data.builders.base import AVBuilder, AVConfig


class Vggss(AVBuilder):
    """VGG-SS test clips with boxes from vggss.json (fmt "vggss"); label = index of the clip's
    class in annotations.vggss_class_names()."""

    name = "vggss"
    GT_FORMAT = "vggss"
    BUILDER_CONFIGS = [
        AVConfig(name="test", split_list="vggss_test", test=True, description="VGG-SS test"),
        AVConfig(name="heard_test", split_list="vggss_heard_test", test=True,
                 description="VGG-SS clips of the 110 heard classes"),
        AVConfig(name="unheard_test", split_list="vggss_unheard_test", test=True,
                 description="VGG-SS clips of the 110 unheard classes"),
        AVConfig(name="plus_silent", split_list="vggss_test", test=True,
                 plus_silent="vggss_test_plus_silent",
                 description="VGG-SS test plus non-sounding pairs (extended evaluation)"),
    ]

    def _jobs(self, root):
        config = self.builder_config
        ids = self._ids if self._ids is not None else annotations.read_split(config.split_list)
        boxes = annotations.load_vggss()
        classes = annotations.vggss_classes()
        label_of = {name: i for i, name in enumerate(annotations.vggss_class_names())}
        jobs = []
        for i in ids:
            job = _clips.make_job(i, root, image_size=config.image_size, test=True,
                                  sounding=True, boxes=boxes.get(i),
                                  label=label_of.get(classes.get(i), -1))
            if i not in boxes:
                job["missing_annotation"] = "vggss.json (no entry for this id)"
            jobs.append(job)
        return {"test": jobs + self._plus_silent_jobs(root)}
