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
from foveation.models.segmenter import OUTPUT_STRIDE
from foveation.patches import IGNORE_INDEX, XR_CONTEXT, location_centres, make_xr, mode_pool
from foveation.slides import SlideReader


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
        """The 7x7 x_r neighbourhoods, made by ``patches.make_xr`` itself (the one function that
        makes x_r) on the 7s x 7s window around each location, read from the coarsest level
        whose downsample divides s, so every x_r pixel is an exact area mean."""
        s, k = self.cfg.patches.xr_scale, 2 * XR_CONTEXT + 1
        levels = self.image.levels
        whole = [
            i
            for i, L in enumerate(levels)
            if float(L.downsample).is_integer() and s % int(L.downsample) == 0
        ]
        lv = max(whole, key=lambda i: levels[i].downsample)
        ds = int(levels[lv].downsample)
        out = np.empty((len(locs), 3, k, k), np.float32)
        for n, (i, j) in enumerate(np.asarray(locs).tolist()):
            top, left = (i - XR_CONTEXT) * s // ds, (j - XR_CONTEXT) * s // ds
            win = self.image.read_level(lv, top, left, k * s // ds, k * s // ds, self.pad)[..., :3]
            chw = torch.from_numpy(np.ascontiguousarray(win)).permute(2, 0, 1)
            L = levels[lv]
            rows = torch.arange(top, top + k * s // ds)
            cols = torch.arange(left, left + k * s // ds)
            inside = ((rows >= 0) & (rows < L.height))[:, None] & ((cols >= 0) & (cols < L.width))[
                None, :
            ]
            out[n] = make_xr(chw, s // ds, self.cfg.model.mean, self.cfg.model.std, inside).numpy()
        return out

    def labels(self, locs: np.ndarray) -> np.ndarray:
        pc = self.cfg.patches
        n = pc.patch_size // OUTPUT_STRIDE
        f1 = pc.fovs[0]
        q = f1 / n  # level-0 px per label px
        if self.label is None:
            raise ValueError(f"{self.image.uri}: no label map to crop labels from")
        out = np.empty((len(locs), n, n), np.uint8)
        for i, (cy, cx) in enumerate(location_centres(torch.as_tensor(locs), pc.xr_scale).tolist()):
            win = self.label.read_level(
                0, round(cy - f1 / 2), round(cx - f1 / 2), f1, f1, (IGNORE_INDEX,) * 3
            )[..., 0]
            if q == int(q):
                out[i] = mode_pool(
                    torch.from_numpy(win), int(q), self.cfg.model.num_classes
                ).numpy()
            else:  # not whole pixels per label pixel: the class at each label pixel's centre
                idx = ((np.arange(n) + 0.5) * q).astype(np.int64)
                out[i] = win[idx[:, None], idx[None, :]]
        return out

    def batch(self, locs: np.ndarray, slide_id: str = "") -> dict[str, np.ndarray]:
        locs = np.asarray(locs, np.int64).reshape(-1, 2)
        if len(locs) == 0:  # a slide without tissue: an empty batch, not an error
            return empty_batch(self.cfg)
        out = {"bank": self.bank(locs), "xr": self.xr(locs), "loc": locs.astype(np.int32)}
        if self.label is not None:
            out["label"] = self.labels(locs)
        out["slide_id"] = np.array([slide_id] * len(locs))
        return out


def empty_batch(cfg: Config) -> dict[str, np.ndarray]:
    pc = cfg.patches
    P, n, k = pc.patch_size, pc.patch_size // OUTPUT_STRIDE, 2 * XR_CONTEXT + 1
    return {
        "bank": np.zeros((0, pc.depth, 3, P, P), np.uint8),
        "xr": np.zeros((0, 3, k, k), np.float32),
        "loc": np.zeros((0, 2), np.int32),
        "label": np.zeros((0, n, n), np.uint8),
        "slide_id": np.array([], dtype="<U1"),
    }
