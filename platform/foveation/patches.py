"""Patch-bank geometry and vectorised extraction (docs/method.md#geometry).

Conventions, used everywhere in the platform:

- Pixel ``k`` covers ``[k, k + 1)``; x_r pixel ``(i, j)`` covers ``[i s, (i + 1) s)`` of the image,
  so its centre, where all D patches of location ``(i, j)`` are centred, is ``((i + 0.5) s,
  (j + 0.5) s)`` (the paper's "centred at the i-th pixel of x_r"; the authors' code is off by
  ``(P1 - s) / 2``). A patch of FoV ``F`` covers ``[c - F/2, c + F/2)`` per axis.
- Locations are x_r pixel indices ``(row, col)``, int, shape ``[N, 2]``.
- Images are uint8 tensors ``[3, H, W]``; labels uint8 ``[H, W]`` with ignore index 255.

``area`` mode builds, once per image, one downsampled copy of the padded image per FoV
(average pooling by the integer ratio ``F/P``, or an antialiased resize for a non-integer
one), so cutting a patch is an index gather, not a resize: area-correct and cheap.
``reference`` mode reproduces the authors' crop then bilinear resize (align_corners=False,
no antialias) exactly, vectorised over locations, for parity tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from foveation.config import PatchSetConfig
from foveation.geometry import IGNORE_INDEX, OUTPUT_STRIDE, XR_CONTEXT


def location_centres(locs: Tensor, xr_scale: int) -> Tensor:
    """Full-resolution centres (float, [N, 2], row/col) of x_r locations ``locs`` [N, 2]."""
    return (locs.to(torch.float64) + 0.5) * xr_scale


def xr_shape(height: int, width: int, xr_scale: int) -> tuple[int, int]:
    """Size of x_r: one pixel per started ``s x s`` block, so every image pixel has a location."""
    return math.ceil(height / xr_scale), math.ceil(width / xr_scale)


def all_locations(height: int, width: int, xr_scale: int) -> Tensor:
    """Every x_r location of an image, row-major, [h * w, 2] int64."""
    h, w = xr_shape(height, width, xr_scale)
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([ii.reshape(-1), jj.reshape(-1)], dim=1)


def normalise(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8-range (or float in [0, 255]) RGB -> (x/255 - mean) / std, channel dim at -3."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1) * 255.0
    return (x.to(torch.float32) - m) / s


def make_xr(
    image: Tensor,
    xr_scale: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    inside: Tensor | None = None,
) -> Tensor:
    """The low-resolution copy x_r of a uint8 image [3, H, W] (or a batch of windows
    [N, 3, H, W]): normalised, [3, h, w] (or [N, 3, h, w]) float32.

    The one function that makes x_r, for training, evaluation and serving alike. Area mean
    over each ``s x s`` block (the authors' bilinear resize without antialias aliases); a last,
    partial block is completed with the mean colour, i.e. zero after normalisation. ``inside``
    ([H, W] bool) marks the pixels of a window that lie in the image; the rest count as that
    padding too, so a window's x_r equals the whole image's.
    """
    batched = image.ndim == 4
    H, W = image.shape[-2:]
    h, w = xr_shape(H, W, xr_scale)
    x = normalise(image, mean, std)
    x = x if batched else x.unsqueeze(0)
    if inside is not None:  # a window that reaches beyond the image: outside counts as padding
        x = x * inside.to(x.dtype)
    x = F.pad(x, (0, w * xr_scale - W, 0, h * xr_scale - H))  # zero == mean colour
    out = F.avg_pool2d(x, xr_scale)
    return out if batched else out[0]


def pad_xr(xr: Tensor) -> Tensor:
    """Zero-pad x_r [.., 3, h, w] by the foveation net's context so valid convs give [h, w]."""
    return F.pad(xr, (XR_CONTEXT,) * 4)


def xr_neighbourhoods(xr: Tensor, locs: Tensor) -> Tensor:
    """The ``k x k`` (k = 7) x_r neighbourhood of each location, [N, 3, k, k] (training batch ``xr``)."""
    k = 2 * XR_CONTEXT + 1
    padded = pad_xr(xr)
    r = locs[:, 0].long()[:, None] + torch.arange(k)[None]  # [N, k] rows in padded coords
    c = locs[:, 1].long()[:, None] + torch.arange(k)[None]
    out = padded[:, r[:, :, None], c[:, None, :]]  # [3, N, k, k]
    return out.permute(1, 0, 2, 3).contiguous()


def pad_indices(n: int, before: int, after: int) -> Tensor:
    """Source indices of a reflect-padded axis of length n, for any pad (also pad >= n)."""
    idx = torch.arange(-before, n + after)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.abs() % period
    return torch.where(idx >= n, period - idx, idx)


def pad_image(image: Tensor, pads: tuple[int, int, int, int], mode: str, value) -> Tensor:
    """Pad [C, H, W] by (top, bottom, left, right) with a per-channel constant or by reflection."""
    top, bottom, left, right = pads
    C, H, W = image.shape
    if mode == "reflect":
        rows = pad_indices(H, top, bottom)
        cols = pad_indices(W, left, right)
        return image[:, rows[:, None], cols[None, :]]
    out = torch.empty(
        (C, H + top + bottom, W + left + right), dtype=image.dtype, device=image.device
    )
    fill = torch.as_tensor(value, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
    out[:] = fill
    out[:, top : top + H, left : left + W] = image
    return out


def mode_pool(label: Tensor, factor: int, num_classes: int) -> Tensor:
    """Majority class of each ``factor x factor`` block of a uint8 label [..., H, W] (ties -> lower id;
    a block mostly ignore stays ignore). Labels never shrink by averaging."""
    if factor == 1:
        return label
    lead, (H, W) = label.shape[:-2], label.shape[-2:]
    best = torch.full((*lead, H // factor, W // factor), IGNORE_INDEX, dtype=torch.uint8)
    best_count = torch.full(best.shape, -1.0)
    flat = label.reshape(-1, 1, H, W)
    for c in [*range(num_classes), IGNORE_INDEX]:
        count = F.avg_pool2d((flat == c).to(torch.float32), factor).reshape(best.shape)
        better = count > best_count
        best[better] = c
        best_count = torch.where(better, count, best_count)
    return best


def _bilinear_gather(img: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
    """Separable bilinear samples of img [C, H, W] at per-location coordinates ys [N, P], xs [N, Q]
    (pixel-centre coordinates, already in range), returned as [N, C, P, Q].

    Integer coordinates take a single gather in img's dtype (the common, aligned case);
    otherwise the result is float32."""
    y0 = ys.floor()
    x0 = xs.floor()
    wy = (ys - y0).to(torch.float32)
    wx = (xs - x0).to(torch.float32)
    y0 = y0.long()
    x0 = x0.long()
    if not bool(wy.any()) and not bool(wx.any()):
        return img[:, y0[:, :, None], x0[:, None, :]].permute(1, 0, 2, 3)
    H, W = img.shape[-2:]
    y1 = (y0 + 1).clamp(max=H - 1)
    x1 = (x0 + 1).clamp(max=W - 1)
    f = img.to(torch.float32)
    # Same association order as torch's upsample_bilinear2d, for 1e-6 parity.
    top = (
        f[:, y0[:, :, None], x0[:, None, :]] * (1 - wx)[None, :, None, :]
        + f[:, y0[:, :, None], x1[:, None, :]] * wx[None, :, None, :]
    )
    bot = (
        f[:, y1[:, :, None], x0[:, None, :]] * (1 - wx)[None, :, None, :]
        + f[:, y1[:, :, None], x1[:, None, :]] * wx[None, :, None, :]
    )
    out = top * (1 - wy)[None, :, :, None] + bot * wy[None, :, :, None]
    return out.permute(1, 0, 2, 3)


def _reference_source_index(fov: int, size: int) -> Tensor:
    """Source coordinates of torch's bilinear resize fov -> size, align_corners=False."""
    scale = torch.tensor(fov / size, dtype=torch.float32)
    dst = torch.arange(size, dtype=torch.float32)
    return ((dst + 0.5) * scale - 0.5).clamp(min=0).to(torch.float64)


@dataclass(frozen=True)
class _Level:
    """One downsampled copy of the padded canvas, for one FoV."""

    pixels: Tensor  # [C, h, w], uint8 or float
    step: float  # canvas pixels per level pixel (== F / P when the resize was exact)


class PatchExtractor:
    """Cuts D-patch banks for any locations of one image (labels and x_r neighbourhoods are cut
    by ``data.batches.BatchExtractor``, which uses this for in-memory banks).

    Build it once per image (the padded canvas and the per-FoV levels are made here, once);
    then :meth:`bank` costs one gather per FoV for any number of locations.
    ``origin`` is the image coordinate of ``canvas[:, 0, 0]``: whole-slide inference builds
    extractors over windows of a slide and passes their origin.
    """

    def __init__(
        self,
        canvas: Tensor,
        cfg: PatchSetConfig,
        origin: tuple[int, int] = (0, 0),
        output_stride: int = OUTPUT_STRIDE,
    ) -> None:
        if canvas.ndim != 3 or canvas.shape[0] != 3:
            raise ValueError(
                f"canvas: expected an RGB tensor [3, H, W], got shape {tuple(canvas.shape)}"
            )
        self.cfg = cfg
        self.canvas = canvas
        self.origin = origin
        self.output_stride = output_stride
        P = cfg.patch_size
        self.levels: list[_Level] = []
        if cfg.resample == "area":
            for fov in cfg.fovs:
                self.levels.append(_area_level(canvas, fov / P))

    # -- construction from a whole in-memory image ---------------------------------------
    @classmethod
    def from_image(
        cls,
        image: Tensor,
        cfg: PatchSetConfig,
        pad_value=(0, 0, 0),
        output_stride: int = OUTPUT_STRIDE,
    ) -> PatchExtractor:
        """Pad the image once, by enough for every x_r location's largest patch."""
        _, H, W = image.shape
        top, bottom, left, right = canvas_pads(H, W, cfg, output_stride)
        canvas = pad_image(image, (top, bottom, left, right), cfg.padding, pad_value)
        return cls(canvas, cfg, (-top, -left), output_stride)

    # -- extraction -------------------------------------------------------------------------
    def _starts(self, locs: Tensor, fov: int) -> Tensor:
        """Canvas coordinates [N, 2] (float64) of each patch's top-left corner."""
        c = location_centres(locs, self.cfg.xr_scale)
        o = torch.tensor(self.origin, dtype=torch.float64)
        return c - fov / 2 - o

    def bank(self, locs: Tensor) -> Tensor:
        """The patch bank [N, D, C, P, P] for x_r locations ``locs`` [N, 2], in the canvas dtype."""
        locs = torch.as_tensor(locs)
        P = self.cfg.patch_size
        out = torch.empty(
            (len(locs), self.cfg.depth, self.canvas.shape[0], P, P), dtype=self.canvas.dtype
        )
        for d, fov in enumerate(self.cfg.fovs):
            start = self._starts(locs, fov)
            if self.cfg.resample == "reference":
                src = _reference_source_index(fov, P)
                patches = _bilinear_gather(
                    self.canvas, start[:, 0:1] + src[None], start[:, 1:2] + src[None]
                )
                out[:, d] = _as_dtype(patches, out.dtype)
                continue
            lv = self.levels[d]
            corner = _snap(start / lv.step)
            if lv.step == fov / P and bool((corner == corner.floor()).all()):
                # Aligned (the usual case): each patch is a P x P window of the level, one gather.
                out[:, d] = _windows(lv.pixels, P)[
                    :, corner[:, 0].long(), corner[:, 1].long()
                ].transpose(0, 1)
                continue
            # Centre of output pixel a sits at canvas start + (a + 0.5) F/P; in level pixel
            # coordinates that is that over lv.step, minus 0.5.
            a = (torch.arange(P, dtype=torch.float64) + 0.5) * (fov / P)
            ys = _snap((start[:, 0:1] + a[None]) / lv.step - 0.5)
            xs = _snap((start[:, 1:2] + a[None]) / lv.step - 0.5)
            out[:, d] = _as_dtype(_bilinear_gather(lv.pixels, ys, xs), out.dtype)
        return out


def _windows(img: Tensor, size: int) -> Tensor:
    """A view [C, H - size + 1, W - size + 1, size, size] of every size x size window of img."""
    C, H, W = img.shape
    sc, sh, sw = img.stride()
    return img.as_strided((C, H - size + 1, W - size + 1, size, size), (sc, sh, sw, sh, sw))


def _as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    if x.dtype == dtype:
        return x
    if dtype == torch.uint8:
        return x.round().clamp_(0, 255).to(torch.uint8)
    return x.to(dtype)


def _snap(coords: Tensor) -> Tensor:
    # Float64 geometry can land 1e-12 off an integer; snap so the aligned case stays one gather.
    r = coords.round()
    return torch.where((coords - r).abs() < 1e-6, r, coords)


def _area_level(canvas: Tensor, ratio: float) -> _Level:
    """Area-correct downsampling of the canvas by ``ratio`` (= F / P >= 1)."""
    if ratio == 1:
        return _Level(canvas, 1.0)
    x = canvas.to(torch.float32).unsqueeze(0)
    if ratio == int(ratio):
        k = int(ratio)
        lv = F.avg_pool2d(x, k)[0]
        step = float(k)
    else:
        H, W = canvas.shape[-2:]
        size = (max(1, round(H / ratio)), max(1, round(W / ratio)))
        lv = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        step = H / size[0]  # rows and cols differ by < 1 px / W; the row step is used for both
    if canvas.dtype == torch.uint8:
        lv = lv.round_().clamp_(0, 255).to(torch.uint8)
    return _Level(lv, step)


def canvas_pads(
    height: int, width: int, cfg: PatchSetConfig, output_stride: int = OUTPUT_STRIDE
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding so every x_r location's patches lie inside the canvas.

    The leading pad is a multiple of every integer FoV ratio and of the label factor, so that
    patch corners fall on whole level pixels (one gather, no interpolation); the canvas size is
    rounded up to such a multiple too, so pooled levels lose no partial block.
    """
    s = cfg.xr_scale
    align = alignment(cfg, output_stride)
    # Largest patch reaches F_D/2 - s/2 before the image, plus a margin for bilinear neighbours.
    margin = resample_margin(cfg)
    lead = round_up(max(cfg.fovs) // 2 - s // 2 + margin, align)
    h, w = xr_shape(height, width, s)
    need_h = (h - 0.5) * s + max(cfg.fovs) / 2 + margin
    need_w = (w - 0.5) * s + max(cfg.fovs) / 2 + margin
    bottom = round_up(lead + math.ceil(need_h), align) - lead - height
    right = round_up(lead + math.ceil(need_w), align) - lead - width
    return lead, bottom, lead, right


def resample_margin(cfg: PatchSetConfig) -> int:
    """Canvas pixels kept beyond every patch so interpolation neighbours stay inside."""
    return math.ceil(max(cfg.fovs) / cfg.patch_size) + 1


def alignment(cfg: PatchSetConfig, output_stride: int = OUTPUT_STRIDE) -> int:
    """Canvas origins must be congruent modulo this for patch corners to land on level pixels."""
    ks = [f // cfg.patch_size for f in cfg.fovs if f % cfg.patch_size == 0]
    q = cfg.fovs[0] * output_stride / cfg.patch_size
    if q == int(q):
        ks.append(int(q))
    return math.lcm(*ks) if ks else 1


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def authors_loop_bank(
    image: Tensor, locs: Tensor, cfg: PatchSetConfig, pad_value: float = 0.0
) -> Tensor:
    """What the authors' code does, location by location and scale by scale: pad the whole
    image by F_d - 1, crop F_d x F_d, bilinear resize to P (align_corners=False, no antialias).

    Kept as the parity oracle of ``resample = "reference"`` and the baseline of the ``patches``
    benchmark; never used on a hot path."""
    out = []
    for cy, cx in location_centres(locs, cfg.xr_scale).tolist():
        per = []
        for fov in cfg.fovs:
            pad = fov - 1
            xp = F.pad(image[None].to(torch.float32), (pad, pad, pad, pad), value=pad_value)
            t, left = round(cy - fov / 2) + pad, round(cx - fov / 2) + pad
            crop = xp[:, :, t : t + fov, left : left + fov]
            per.append(
                F.interpolate(
                    crop, size=(cfg.patch_size,) * 2, mode="bilinear", align_corners=False
                )[0]
            )
        out.append(torch.stack(per))
    return torch.stack(out)
