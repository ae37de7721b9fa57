"""VGGSound training sets: the 10k / 144k / heard-110 lists, or every clip on disk."""

from __future__ import annotations

from sslocal.data.builders.base import AVBuilder, AVConfig, train_jobs


class Vggsound(AVBuilder):
    """VGGSound training clips (frames + audio), the marginNCE training sets."""

    name = "vggsound"
    BUILDER_CONFIGS = [
        AVConfig(name="10k", split_list="vggss_10k", description="VGGSound 10k subset"),
        AVConfig(name="144k", split_list="vggss_144k", description="VGGSound 144k subset"),
        AVConfig(name="10k_minus_test", split_list="vggss_10k", exclude_test_clips=True,
                 description="VGGSound 10k subset without the shipped test lists' clips"),
        AVConfig(name="144k_minus_test", split_list="vggss_144k", exclude_test_clips=True,
                 description="VGGSound 144k subset without the shipped test lists' clips"),
        AVConfig(name="full", split_list=None, description="every VGGSound clip on disk"),
        AVConfig(name="heard110", split_list="vggss_heard",
                 description="clips of the 110 heard classes (open-set experiment)"),
    ]

    def _jobs(self, root):
        config = self.builder_config
        return {"train": train_jobs(root, config.split_list, self._ids, config.image_size,
                                    config.exclude_test_clips)}
