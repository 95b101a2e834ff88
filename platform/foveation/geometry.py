"""The geometry constants every part shares, in one place (docs/method.md#geometry).

Nothing here imports anything: config, patches, models, data and inference all read these.
"""

from __future__ import annotations

IGNORE_INDEX = 255
"""Label value that no loss or metric counts (docs/contracts.md#labels)."""

OUTPUT_STRIDE = 4
"""Input pixels per output pixel of the segmenter (HRNetV2's 1/4 output): training labels are
cut at this stride, and a patch size must be a multiple of it."""

XR_CONTEXT = 3
"""Pixels of x_r the foveation net needs on each side of a location (three valid 3x3 convs),
so the training batch carries (2 * XR_CONTEXT + 1)^2 x_r neighbourhoods."""
