"""SLAVC's evaluation preset ("A Closer Look at Weakly-Supervised Audio-Visual Source
Localization", stoneMo/SLAVC test.py and scripts/test_extended_*.sh): maps upsampled bicubically
with align_corners=True, OGL fused from fixed-range scores (alpha * (alpha_ii + 1) / 2 +
(1 - alpha) * obj / 2.5, no min-max) with SLAVC's alpha 0.9, on the extended test sets, scored
by SLAVC's extended evaluator (the default `eval.extended = "slavc"`):

    sslocal evaluate --config configs/slavc_eval.py --checkpoint runs/default --ogl

The prediction stays the protocol's median rule, which is SLAVC's `--relative_prediction`
(min-max, then map >= sorted(map)[S*S//2]). SLAVC's scripts omit that flag and threshold the
fixed-range scores at 0.5 instead (for the AV map: alpha_ii >= 0), which sslocal does not offer
for the AV map; for the OGL map, `--config.eval.threshold=0.5` with this fusion is that rule.
SLAVC's AV + OGL rows also rank by the fused map's confidence; sslocal's confidence is always
the AV map's (docs/protocol.md section 6).

Differs from default.py in: test_datasets, eval.upsample, eval.ogl_fusion, eval.ogl_alpha.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.test_datasets = ("vggss/plus_silent", "flickr_soundnet/test_plus_silent")
    config.eval.upsample = "bicubic_align_corners"
    config.eval.ogl_fusion = "slavc"
    config.eval.ogl_alpha = 0.9
    return config
