"""Training batches cut from slides through ``SlideReader``: the Core extractor's geometry
(``patches.py``), each patch read from the pyramid level that holds it downsampled, so a
batch is the same as the in-memory extractor's (within JPEG tolerance) without ever holding
a whole slide. The batch is DESIGN.md's training batch:

    bank  uint8  [N, D, 3, P, P]    xr  float32 [N, 3, 7, 7]    label  uint8 [N, P/r, P/r]
    loc   int32  [N, 2]             slide_id
"""

from __future__ import annotations

import numpy as np
import torch

from foveation.config import Config
from foveation.patches import IGNORE_INDEX, XR_CONTEXT, location_centres, mode_pool, normalise
from foveation.slides import SlideReader

OUTPUT_STRIDE = 4  # the segmenter's (models.segmenter.OUTPUT_STRIDE), without importing timm here


class SlideBankReader:
    def __init__(self, cfg: Config, image: SlideReader, label: SlideReader | None = None) -> None:
        if cfg.patches.padding != "constant":
            raise ValueError(
                "patches.padding: slides are read with 'constant' (mean-colour) padding; "
                f"{cfg.patches.padding!r} is only available for in-memory images"
            )
        self.cfg, self.image, self.label = cfg, image, label
        self.pad = cfg.model.pad_value

    def bank(self, locs: np.ndarray) -> np.ndarray:
        pc = self.cfg.patches
        P = pc.patch_size
        centres = location_centres(torch.as_tensor(locs), pc.xr_scale).tolist()
        out = np.empty((len(locs), pc.depth, 3, P, P), np.uint8)
        for n, c in enumerate(centres):
            for d, fov in enumerate(pc.fovs):
                out[n, d] = self.image.read_region(c, fov, P, self.pad)[..., :3].transpose(2, 0, 1)
        return out

    def xr(self, locs: np.ndarray) -> np.ndarray:
        """The 7x7 x_r neighbourhoods: the area means of the 7x7 s-blocks around each location
        (what ``patches.make_xr`` makes), normalised; beyond the slide the mean colour, i.e. 0."""
        s, k = self.cfg.patches.xr_scale, 2 * XR_CONTEXT + 1
        centres = location_centres(torch.as_tensor(locs), s).tolist()
        raw = np.stack([self.image.read_region(c, k * s, k, self.pad)[..., :3] for c in centres])
        x = normalise(
            torch.from_numpy(raw).permute(0, 3, 1, 2), self.cfg.model.mean, self.cfg.model.std
        )
        return x.numpy()

    def labels(self, locs: np.ndarray) -> np.ndarray:
        pc = self.cfg.patches
        n = pc.patch_size // OUTPUT_STRIDE
        f1 = pc.fovs[0]
        q = f1 // n
        if self.label is None:
            raise ValueError(f"{self.image.uri}: no label map to crop labels from")
        out = np.empty((len(locs), n, n), np.uint8)
        for i, (cy, cx) in enumerate(location_centres(torch.as_tensor(locs), pc.xr_scale).tolist()):
            win = self.label.read_level(
                0, round(cy - f1 / 2), round(cx - f1 / 2), f1, f1, (IGNORE_INDEX,) * 3
            )[..., 0]
            out[i] = (
                mode_pool(torch.from_numpy(win), q, self.cfg.model.num_classes).numpy()
                if q > 1
                else win
            )
        return out

    def batch(self, locs: np.ndarray, slide_id: str = "") -> dict[str, np.ndarray]:
        locs = np.asarray(locs, np.int64).reshape(-1, 2)
        out = {"bank": self.bank(locs), "xr": self.xr(locs), "loc": locs.astype(np.int32)}
        if self.label is not None:
            out["label"] = self.labels(locs)
        out["slide_id"] = np.array([slide_id] * len(locs))
        return out
