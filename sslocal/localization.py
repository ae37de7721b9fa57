"""The former name of `sslocal.maps` (public API: `localization.av_map`, `localization.fuse_ogl`).

Kept so that code written against it keeps working; new code imports `sslocal.maps`.
"""

from sslocal.maps import (  # noqa: F401
    UPSAMPLE_METHODS,
    av_map,
    fuse_ogl,
    interpolation_matrix,
    minmax_normalize,
    object_map,
    upsample_maps,
)
