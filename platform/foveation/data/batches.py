"""The one extractor of training batches (docs/contracts.md#training-batch).

``BatchExtractor`` cuts the training batch of any x_r locations of one image:

    bank   uint8    [N, D, 3, P, P]  the D concentric patches, each resized to P x P
    xr     float32  [N, 3, 7, 7]     the x_r neighbourhood the foveation net reads
    label  uint8    [N, P/r, P/r]    the smallest patch's area at the output stride r
    loc    int32    [N, 2]           x_r (row, col)
    slide_id                         one string per row

over a region source: an in-memory image (``ArrayImage``, the single-device trainer and the
science check) or a pyramidal slide (``slides.SlideReader``, the Ray Data pipeline). The
geometry lives here once (where each patch, x_r window and label window lies, how labels are
pooled, how x_r is made); a source only reads pixels. Both kinds of source give the same batch
within JPEG tolerance (``tests/unit/test_slidebank.py``).

A source needs ``height``, ``width``, ``levels`` (``slides.Level``: downsample, height,
width), ``level_for(fov, out)``, ``read_level(level, top, left, h, w, pad)`` -> uint8
[h, w, C] and ``read_region(centre, fov, P, pad)`` -> uint8 [P, P, C]; a source may add
vectorised ``read_windows`` / ``read_banks`` (the in-memory one does: one gather for all
locations instead of one read each).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from foveation.config import Config
from foveation.geometry import IGNORE_INDEX, OUTPUT_STRIDE, XR_CONTEXT
from foveation.io.images import as_rgb_uint8
from foveation.io.slides import Level
from foveation.patches import PatchExtractor, location_centres, make_xr, mode_pool, pad_image

XR_WINDOW = 2 * XR_CONTEXT + 1
"""Side of the x_r neighbourhood in the batch (the foveation net's receptive field)."""


class ArrayImage:
    """An in-memory image (uint8 [H, W, C] or [C, H, W] tensor) as a region source.

    Patch banks come from ``patches.PatchExtractor`` (the per-FoV area levels are built once,
    then a bank is one gather per FoV); windows are one gather over a canvas padded once. Label
    maps are a one-channel ``ArrayImage`` (``channels=1``)."""

    def __init__(self, image, cfg: Config, pad_value=None, channels: int = 3) -> None:
        t = torch.as_tensor(np.ascontiguousarray(image))
        if t.ndim == 2:
            t = t[None]
        elif t.ndim == 3 and t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3, 4):
            t = t.permute(2, 0, 1)
        if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[0] < channels:
            raise ValueError(
                f"image: expected uint8 [H, W, {channels}] or [{channels}, H, W], got "
                f"{t.dtype} {tuple(t.shape)}"
            )
        self.pixels = t[:channels].contiguous()
        self.cfg = cfg
        self.bands = channels
        self.height, self.width = int(t.shape[1]), int(t.shape[2])
        self.levels = [Level(self.width, self.height, 1.0, None)]
        self.pad_value = tuple(cfg.model.pad_value) if pad_value is None else tuple(pad_value)
        self._banks: PatchExtractor | None = None
        self._canvas: tuple[int, tuple, Tensor] | None = None  # (margin, fill, canvas)

    def level_for(self, fov: float, out_size: int) -> int:
        return 0

    def read_level(self, level: int, top: int, left: int, height: int, width: int, pad_value=None):
        """uint8 [height, width, C]; area beyond the image is ``pad_value``."""
        pad = self.pad_value if pad_value is None else pad_value
        out = np.empty((height, width, self.bands), np.uint8)
        out[:] = np.asarray(pad, np.uint8)[: self.bands]
        t0, l0 = max(top, 0), max(left, 0)
        t1, l1 = min(top + height, self.height), min(left + width, self.width)
        if t1 > t0 and l1 > l0:
            inner = self.pixels[:, t0:t1, l0:l1].permute(1, 2, 0).numpy()
            out[t0 - top : t1 - top, l0 - left : l1 - left] = inner
        return out

    def read_windows(self, corners: Tensor, size: int, pad_value) -> Tensor:
        """uint8 [N, C, size, size] windows whose top-left corners are ``corners`` [N, 2]
        (level-0 px, anywhere: beyond the image is ``pad_value``), one gather for all."""
        corners = torch.as_tensor(corners, dtype=torch.int64).reshape(-1, 2)
        # How far the windows reach beyond the image; the padded canvas is kept and rebuilt
        # only when a call reaches further (or pads with another value), not every batch.
        need = 0
        if len(corners):
            lo = int(corners.min())
            hi = max(
                int(corners[:, 0].max()) + size - self.height,
                int(corners[:, 1].max()) + size - self.width,
            )
            need = max(0, -lo, hi)
        fill = tuple(int(v) for v in np.atleast_1d(pad_value)[: self.bands])
        if self._canvas is None or self._canvas[0] < need or self._canvas[1] != fill:
            m = max(need, size)  # room for the usual reach without a rebuild
            self._canvas = (m, fill, pad_image(self.pixels, (m, m, m, m), "constant", fill))
        m, _, canvas = self._canvas
        C, H, W = canvas.shape
        sc, sh, sw = canvas.stride()
        view = canvas.as_strided((C, H - size + 1, W - size + 1, size, size), (sc, sh, sw, sh, sw))
        return view[:, corners[:, 0] + m, corners[:, 1] + m].transpose(0, 1)

    def read_banks(self, locs: Tensor) -> Tensor:
        """uint8 [N, D, 3, P, P] for x_r locations [N, 2]."""
        if self._banks is None:
            pc = self.cfg.patches
            self._banks = PatchExtractor.from_image(
                self.pixels, pc, self.pad_value, output_stride=OUTPUT_STRIDE
            )
        return self._banks.bank(locs)

    def close(self) -> None:
        pass


def tissue_locations(reader, cfg: Config) -> np.ndarray:
    """x_r locations [M, 2] whose area-mean luminance is below the background threshold,
    from the finest level not finer than x_r (a few KB to read)."""
    s = cfg.patches.xr_scale
    h, w = -(-reader.height // s), -(-reader.width // s)
    k = reader.level_for(s, 1)
    lv = reader.levels[k]
    img = reader.read_level(k, 0, 0, lv.height, lv.width)
    lum = torch.from_numpy(img[..., :3].astype(np.float32).mean(-1))[None, None]
    # Cover the level with the x_r grid (pad the partial last block with white: background).
    step = s / lv.downsample
    ph, pw = round(h * step) - lv.height, round(w * step) - lv.width
    lum = F.pad(lum, (0, max(0, pw), 0, max(0, ph)), value=255.0)
    grid = F.adaptive_avg_pool2d(lum, (h, w))[0, 0]
    mask = grid < cfg.data.pipeline.tissue_threshold
    return torch.nonzero(mask).numpy()


def labelled_cells(label, cfg: Config) -> np.ndarray:
    """[h, w] bool on the x_r grid: cells holding any labelled pixel (not 255), read from the
    label pyramid's finest level not finer than x_r (levels are shrunk by mode, so a cell
    reads as labelled where most of its block is)."""
    s = cfg.patches.xr_scale
    h, w = -(-label.height // s), -(-label.width // s)
    k = label.level_for(s, 1)
    lv = label.levels[k]
    lab = np.asarray(label.read_level(k, 0, 0, lv.height, lv.width))
    lab = lab[..., 0] if lab.ndim == 3 else lab
    known = torch.from_numpy((lab != IGNORE_INDEX).astype(np.float32))[None, None]
    step = s / lv.downsample
    ph, pw = round(h * step) - lv.height, round(w * step) - lv.width
    known = F.pad(known, (0, max(0, pw), 0, max(0, ph)), value=0.0)
    return F.adaptive_max_pool2d(known, (h, w))[0, 0].numpy() > 0


def sample_locations(
    source, cfg: Config, seed: int, epoch: int, slide_id: str, label=None
) -> np.ndarray:
    """One epoch's training locations [n, 2] of one slide: ``locations_per_image`` distinct x_r
    locations on tissue (and, given the ``label`` pyramid, where it holds labels: a slide
    annotated in part trains only where it is annotated), seeded by (seed, epoch, slide id),
    so every trainer (and every rerun) draws the same ones."""
    locs = tissue_locations(source, cfg)
    if label is not None and len(locs):
        known = labelled_cells(label, cfg)
        locs = locs[known[locs[:, 0], locs[:, 1]]]
    rng = np.random.default_rng([seed, epoch, zlib.crc32(slide_id.encode())])
    n = min(cfg.training.locations_per_image, len(locs))
    return locs[rng.choice(len(locs), size=n, replace=False)] if n else locs[:0]


class BatchExtractor:
    """Training batches of one image (and its label map) through a region source."""

    def __init__(self, cfg: Config, image, label=None) -> None:
        if cfg.patches.padding != "constant":
            raise ValueError(
                "patches.padding: training batches are cut with 'constant' (mean-colour) "
                f"padding; {cfg.patches.padding!r} is only used by whole-image inference"
            )
        self.cfg, self.image, self.label = cfg, image, label
        self.pad = tuple(cfg.model.pad_value)

    @classmethod
    def from_arrays(cls, cfg: Config, image, label=None, name: str = "image") -> BatchExtractor:
        """Over an in-memory image [H, W, 3] (grey, RGBA and float in 0..255 are converted;
        NaN is refused) and label map [H, W]; ``name`` is what errors call them."""
        img = ArrayImage(as_rgb_uint8(image, f"image {name!r}"), cfg)
        lab = None
        if label is not None:
            lab = ArrayImage(np.asarray(label, np.uint8), cfg, (IGNORE_INDEX,), channels=1)
            if (lab.height, lab.width) != (img.height, img.width):
                raise ValueError(
                    f"label of {name!r}: shape {(lab.height, lab.width)} differs from the "
                    f"image's {(img.height, img.width)}"
                )
        return cls(cfg, img, lab)

    # -- the three parts of a batch ------------------------------------------------------------
    def bank(self, locs) -> Tensor:
        """uint8 [N, D, 3, P, P]: each patch read from the source at the level that holds it
        downsampled (never the full-resolution crop when a level already has it)."""
        locs = torch.as_tensor(np.asarray(locs), dtype=torch.int64).reshape(-1, 2)
        if hasattr(self.image, "read_banks"):
            return self.image.read_banks(locs)
        pc = self.cfg.patches
        P = pc.patch_size
        out = np.empty((len(locs), pc.depth, 3, P, P), np.uint8)
        for n, c in enumerate(location_centres(locs, pc.xr_scale).tolist()):
            for d, fov in enumerate(pc.fovs):
                out[n, d] = self.image.read_region(c, fov, P, self.pad)[..., :3].transpose(2, 0, 1)
        return torch.from_numpy(out)

    def xr(self, locs) -> Tensor:
        """float32 [N, 3, 7, 7]: ``patches.make_xr`` (the one function that makes x_r) on the
        7s x 7s window around each location, read from the coarsest level whose downsample
        divides s, so every x_r pixel is an exact area mean; outside the image counts as the
        mean colour, as for the whole image's x_r."""
        locs = torch.as_tensor(np.asarray(locs), dtype=torch.int64).reshape(-1, 2)
        s, k = self.cfg.patches.xr_scale, XR_WINDOW
        levels = self.image.levels
        whole = [
            i
            for i, L in enumerate(levels)
            if float(L.downsample).is_integer() and s % int(L.downsample) == 0
        ]
        lv = max(whole, key=lambda i: levels[i].downsample)
        ds = int(levels[lv].downsample)
        side = k * s // ds
        corners = (locs - XR_CONTEXT) * (s // ds)
        windows = self._windows(self.image, lv, corners, side, self.pad)[:, :3]
        L = levels[lv]
        offs = torch.arange(side)
        rows = corners[:, 0:1] + offs[None]
        cols = corners[:, 1:2] + offs[None]
        inside = ((rows >= 0) & (rows < L.height))[:, :, None] & ((cols >= 0) & (cols < L.width))[
            :, None, :
        ]
        m = self.cfg.model
        return make_xr(windows, s // ds, m.mean, m.std, inside[:, None])

    def labels(self, locs) -> Tensor:
        """uint8 [N, P/r, P/r]: each label pixel the majority class of the ``F1 r / P`` square
        it covers (labels never shrink by averaging); when that square is not whole pixels,
        the class at its centre."""
        if self.label is None:
            raise ValueError(f"{getattr(self.image, 'uri', 'image')}: no label map to cut labels")
        locs = torch.as_tensor(np.asarray(locs), dtype=torch.int64).reshape(-1, 2)
        pc = self.cfg.patches
        n = pc.patch_size // OUTPUT_STRIDE
        f1 = pc.fovs[0]
        q = f1 / n  # level-0 px per label px
        c = location_centres(locs, pc.xr_scale)
        corners = (c - f1 / 2).round().long()
        win = self._windows(self.label, 0, corners, f1, (IGNORE_INDEX,) * 3)[:, 0]
        if q == int(q):
            return mode_pool(win, int(q), self.cfg.model.num_classes)
        idx = ((torch.arange(n) + 0.5) * q).long()
        return win[:, idx[:, None], idx[None, :]]

    def batch(self, locs, slide_id: str = "") -> dict[str, np.ndarray]:
        """The training batch (numpy, as Ray Data carries it) of locations [N, 2]."""
        locs = np.asarray(locs, np.int64).reshape(-1, 2)
        if len(locs) == 0:  # a slide without tissue: an empty batch, not an error
            return empty_batch(self.cfg)
        out = {
            "bank": self.bank(locs).numpy(),
            "xr": self.xr(locs).numpy(),
            "loc": locs.astype(np.int32),
        }
        if self.label is not None:
            out["label"] = self.labels(locs).numpy()
        out["slide_id"] = np.array([slide_id] * len(locs))
        return out

    @staticmethod
    def _windows(source, level: int, corners: Tensor, size: int, pad) -> Tensor:
        if hasattr(source, "read_windows") and level == 0:
            return source.read_windows(corners, size, pad)
        out = [
            torch.from_numpy(
                np.ascontiguousarray(source.read_level(level, t, left, size, size, pad))
            ).permute(2, 0, 1)
            for t, left in corners.tolist()
        ]
        return torch.stack(out) if out else torch.zeros((0, 1, size, size), dtype=torch.uint8)


def empty_batch(cfg: Config) -> dict[str, np.ndarray]:
    pc = cfg.patches
    P, n, k = pc.patch_size, pc.patch_size // OUTPUT_STRIDE, XR_WINDOW
    return {
        "bank": np.zeros((0, pc.depth, 3, P, P), np.uint8),
        "xr": np.zeros((0, 3, k, k), np.float32),
        "loc": np.zeros((0, 2), np.int32),
        "label": np.zeros((0, n, n), np.uint8),
        "slide_id": np.array([], dtype="<U1"),
    }


def to_torch(batch: dict) -> dict:
    """A numpy training batch as the torch batch the step takes (uint8 stays uint8 until the
    device; slide ids a list), as ``pipeline.torch_batches`` collates it."""
    out = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items() if k != "slide_id"}
    out["slide_id"] = [str(x) for x in batch.get("slide_id", [])]
    return out


def concat(batches: list[dict]) -> dict:
    """Row-wise concatenation of numpy batches (several slides in one step)."""
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
