"""Whole-image inference through a region source into a sink (docs/method.md#inference).

F runs once per image on the whole x_r (made band by band from the source). Then, band by band
of location rows, a window of the image is read (padded beyond the border exactly as training
pads), patch banks are cut for the band's locations, the segmenter runs on batches of them, and
each location's prediction (the area of its smallest patch, upsampled from stride 4) is added
into a row accumulator with a coverage count; rows no later location can touch are normalised
and handed to the sink. Memory is bounded by a band (about twice the largest FoV) times the
image width, whatever the image height. The next band's window is read while the segmenter
runs on the current one; with ``background`` set, glass is neither read nor segmented.

Modes: ``tiled`` (default) puts locations every ``F1 (1 - overlap)`` pixels, so the segmenter
sees about one input pixel per output pixel; ``dense`` is the paper's: every x_r location, a
(F1 / s)^2-fold overlap. Where tiles overlap, each tile's probabilities are weighed by
``blend_window`` (``inference.blend``: a Gaussian falling off towards the tile's border, or
flat) and the sum is divided by the summed weights (coverage-normalised), so a pixel is decided
mostly by the tiles it is central in and tile borders leave no seam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from foveation.config import Config
from foveation.inference.sinks import Sink
from foveation.inference.sources import RegionSource, read_window
from foveation.io.images import to_chw_tensor
from foveation.models.foveated import FoveatedSegmenter
from foveation.models.mixing import MixContext
from foveation.patches import (
    PatchExtractor,
    alignment,
    canvas_pads,
    make_xr,
    pad_xr,
    resample_margin,
    round_up,
    xr_shape,
)


@dataclass(frozen=True)
class InferenceStats:
    locations: int
    forward_pixels: int  # segmenter input pixels
    output_pixels: int

    @property
    def forward_per_output(self) -> float:
        return self.forward_pixels / max(1, self.output_pixels)


def xr_from_source(source: RegionSource, cfg: Config, band_px: int = 1024) -> torch.Tensor:
    """x_r of a source, made band by band (bands are multiples of s, so it equals make_xr of
    the whole image)."""
    s = cfg.patches.xr_scale
    band = s * max(1, band_px // s)
    parts = []
    for top in range(0, source.height, band):
        n = min(band, source.height - top)
        region = to_chw_tensor(source.read_region(top, 0, n, source.width))
        parts.append(make_xr(region, s, cfg.model.mean, cfg.model.std))
    return torch.cat(parts, dim=1)


def grid_indices(n_xr: int, length: int, cfg: Config, mode: str) -> list[int]:
    """x_r indices along one axis at which locations are evaluated."""
    if mode == "dense":
        return list(range(n_xr))
    s, f1 = cfg.patches.xr_scale, cfg.patches.fovs[0]
    step = max(1, math.floor(f1 * (1 - cfg.inference.overlap) / s))
    first = min(
        n_xr - 1, max(0, math.floor(f1 / (2 * s) - 0.5))
    )  # first tile starts at or before 0
    idx = list(range(first, n_xr, step))
    if (idx[-1] + 0.5) * s + f1 / 2 < length:  # last tile must reach the far border
        idx.append(n_xr - 1)
    return idx


def blend_window(size: int, kind: str, device=None) -> torch.Tensor:
    """[size, size] weights of a tile's pixels in the overlap-add: "flat" ones, or "gaussian"
    exp(-d^2 / 2 sigma^2) of the distance d from the tile's centre (per axis) with sigma =
    size / 6, floored at 1e-3 so every covered pixel keeps a weight. MONAI's and nnU-Net's
    sliding windows use size / 8 on large tiles; on the debug model's 32 px tiles at overlap
    0.25, size / 8 left a seam (border/inside disagreement 1.65x), size / 4 a larger one (3.7x:
    a tile's weight at its own border is still 14% of the total), size / 6 none (0.72x)."""
    if kind == "flat":
        return torch.ones((size, size), device=device)
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * (size / 6) ** 2))
    return (g[:, None] * g[None, :]).clamp_min(1e-3)


class _RowAccumulator:
    """Weighted overlap-add of per-location predictions, over the rows still open."""

    def __init__(
        self, height: int, width: int, k: int, device, window: torch.Tensor, start: int = 0
    ) -> None:
        """``start``: rows above it are already in the sink (a resumed job): predictions for
        them are dropped, and the first rows written are from ``start``."""
        self.height, self.width, self.k, self.device = height, width, k, device
        self.window = window
        self.top = self.floor = start
        self.acc = torch.zeros((k, 0, width), device=device)
        self.cov = torch.zeros((0, width), device=device)

    def add(self, top: int, left: int, p: torch.Tensor) -> None:
        f = p.shape[-1]
        t0, l0 = max(top, 0, self.floor), max(left, 0)
        t1, l1 = min(top + f, self.height), min(left + f, self.width)
        if t1 <= t0 or l1 <= l0:
            return
        if t0 < self.top:
            raise RuntimeError(
                f"prediction for rows from {t0} arrived after rows up to {self.top} were written"
            )
        need = t1 - self.top - self.acc.shape[1]
        if need > 0:
            self.acc = torch.cat(
                [self.acc, torch.zeros((self.k, need, self.width), device=self.device)], 1
            )
            self.cov = torch.cat([self.cov, torch.zeros((need, self.width), device=self.device)], 0)
        r0, r1 = t0 - self.top, t1 - self.top
        win = self.window[t0 - top : t1 - top, l0 - left : l1 - left]
        self.acc[:, r0:r1, l0:l1] += p[:, t0 - top : t1 - top, l0 - left : l1 - left] * win
        self.cov[r0:r1, l0:l1] += win

    def flush(self, until: int, sink: Sink, gaps: bool = False) -> None:
        """Hand rows up to ``until`` to the sink. ``gaps``: pixels no prediction covered (skipped
        background) are written with all probabilities 0; otherwise they are a bug."""
        n = min(until, self.height) - self.top
        if n <= 0:
            return
        if n > self.cov.shape[0]:
            if not gaps:
                raise RuntimeError(f"rows {self.top}..{self.top + n} are not covered")
            more = n - self.cov.shape[0]
            self.acc = torch.cat(
                [self.acc, torch.zeros((self.k, more, self.width), device=self.device)], 1
            )
            self.cov = torch.cat([self.cov, torch.zeros((more, self.width), device=self.device)])
        cov = self.cov[:n]
        if not gaps and bool((cov == 0).any()):
            raise RuntimeError(f"rows {self.top}..{self.top + n} are not covered by any prediction")
        sink.write_rows(self.top, self.acc[:, :n] / cov.clamp_min(1e-12))
        self.acc, self.cov = self.acc[:, n:].clone(), self.cov[n:].clone()
        self.top += n


def locations_near_tissue(xr: torch.Tensor, cfg: Config, threshold: float) -> torch.Tensor:
    """[h, w] bool: the x_r locations whose output tile may hold tissue, judged on the x_r the
    model already made (``data.batches.tissue_locations`` reads a slide's level for the same
    test when sampling training locations; here no read is added). An x_r pixel is tissue
    when its mean colour (0-255) is darker than ``threshold``; a location is kept when a tissue
    pixel lies within its smallest FoV's reach (F1 / 2s x_r pixels, plus one for the blend)."""
    mean = torch.tensor(cfg.model.mean, device=xr.device).view(3, 1, 1)
    std = torch.tensor(cfg.model.std, device=xr.device).view(3, 1, 1)
    tissue = ((xr * std + mean) * 255).mean(0) < threshold
    r = math.ceil(cfg.patches.fovs[0] / (2 * cfg.patches.xr_scale)) + 1
    near = F.max_pool2d(tissue[None, None].float(), 2 * r + 1, stride=1, padding=r)
    return near[0, 0] > 0


@dataclass(frozen=True)
class _Band:
    """A band of location rows whose centres span at most the largest FoV, and the window of
    the image its patches are cut from."""

    locs: torch.Tensor  # [n, 2] x_r (row, col) of the locations segmented
    top: int  # the window's first row (same residue as the training canvas)
    height: int  # the window's rows
    complete: int  # rows above this are final once the band is in: the next band's first patch row


@dataclass(frozen=True)
class _BandPlan:
    bands: list[_Band]
    win_left: int  # every window's first column (left of 0: the canvas' padding)
    win_width: int


@torch.inference_mode()
def segment(
    model: FoveatedSegmenter,
    source: RegionSource,
    cfg: Config,
    sink: Sink,
    mode: str | None = None,
    device: torch.device | str = "cpu",
    background: float | None = None,
) -> InferenceStats:
    """Segment a whole image from ``source`` into ``sink``; returns what the segmenter computed.

    ``background``: a tissue threshold (``data.pipeline.tissue_threshold``); locations with no
    tissue near them are not segmented (whole slides are mostly glass), a band without any is
    not even read, and their pixels reach the sink with all class probabilities 0. None (the
    default, what evaluation uses) segments every location. The next band's window is read on
    a thread while the segmenter runs on the current one (libvips and OpenSlide decode outside
    the GIL), so reading and the forward overlap."""
    mode = mode or cfg.inference.mode
    H, W = source.height, source.width
    if H < 1 or W < 1:
        raise ValueError(f"source: empty image ({H} x {W})")
    model.eval()
    device = torch.device(device)
    k = cfg.model.num_classes

    xr = xr_from_source(source, cfg)
    w_map = model.weights(pad_xr(xr)[None].to(device))[0]  # [D, h, w]
    sink.begin(H, W, k)
    # A sink restored from a previous attempt's checkpoint already holds its first rows.
    start_row = int(getattr(sink, "resume_row", 0))
    sink.write_weights(w_map, model.apsm(w_map[None])[0])
    keep = locations_near_tissue(xr, cfg, background) if background is not None else None
    plan = _plan_bands(H, W, cfg, mode, model.output_stride, keep)
    window = blend_window(cfg.patches.fovs[0], cfg.inference.blend, device)
    acc = _RowAccumulator(H, W, k, device, window, start=start_row)
    n_locs = _run_bands(model, source, cfg, plan, w_map, acc, sink, gaps=keep is not None)
    sink.close()
    return InferenceStats(n_locs, n_locs * cfg.patches.patch_size**2, H * W)


def _row_groups(rows: list[int], s: int, fmax: int) -> list[list[int]]:
    """Location rows in groups whose centres span at most the largest FoV."""
    groups, group = [], [rows[0]]
    for i in rows[1:]:
        if (i - group[0]) * s > fmax:
            groups.append(group)
            group = []
        group.append(i)
    groups.append(group)
    return groups


def _plan_bands(
    H: int, W: int, cfg: Config, mode: str, r: int, keep: torch.Tensor | None
) -> _BandPlan:
    """Every band's locations (those ``keep`` marks, when given) and window, for an image of
    ``H`` x ``W`` and a segmenter of output stride ``r``."""
    pc = cfg.patches
    s, f1, fmax = pc.xr_scale, pc.fovs[0], max(pc.fovs)
    h, w = xr_shape(H, W, s)
    rows, cols = grid_indices(h, H, cfg, mode), grid_indices(w, W, cfg, mode)
    lead, _, _, right = canvas_pads(H, W, pc, r)
    align, margin = alignment(pc, r), resample_margin(pc)
    groups = _row_groups(rows, s, fmax)
    cols_t = torch.tensor(cols)
    bands = []
    for b, group in enumerate(groups):
        need_top = math.floor((group[0] + 0.5) * s - fmax / 2) - margin
        need_bot = math.ceil((group[-1] + 0.5) * s + fmax / 2) + margin
        top = -lead + (need_top + lead) // align * align  # same residue as the training canvas
        locs = torch.stack(
            [torch.tensor(group).repeat_interleave(len(cols)), cols_t.repeat(len(group))], dim=1
        )
        if keep is not None:
            locs = locs[keep[locs[:, 0], locs[:, 1]]]
        # Where the band's rows are complete: the first row of the next band's patches.
        complete = round((groups[b + 1][0] + 0.5) * s - f1 / 2) if b + 1 < len(groups) else H
        bands.append(_Band(locs, top, round_up(need_bot - top, align), complete))
    return _BandPlan(bands, -lead, lead + W + right)


def _run_bands(
    model: FoveatedSegmenter,
    source: RegionSource,
    cfg: Config,
    plan: _BandPlan,
    w_map: torch.Tensor,
    acc: _RowAccumulator,
    sink: Sink,
    gaps: bool,
) -> int:
    """Segment the plan's bands into ``acc``, flushing each band's complete rows to ``sink``,
    the next band's window read on a thread meanwhile; returns the locations segmented.

    A band's patches end before the band after next begins, so rows from a resumed start row
    (``acc.floor``) need only the last band complete at or above it, and those after (b0)."""
    from concurrent.futures import ThreadPoolExecutor

    pc = cfg.patches
    s, f1 = pc.xr_scale, pc.fovs[0]
    bands, start_row = plan.bands, acc.floor

    def read(b: int):
        band = bands[b]
        if not len(band.locs):
            return None
        return read_window(
            source,
            band.top,
            plan.win_left,
            band.height,
            plan.win_width,
            pc.padding,
            cfg.model.pad_value,
        )

    b0 = max([b for b, band in enumerate(bands) if band.complete <= start_row], default=0)
    n_locs = 0
    ctx = MixContext(cfg.model.mix, training=False)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="band-reader") as pool:
        ahead = pool.submit(read, b0)
        for b, band in enumerate(bands):
            if b < b0 or start_row >= acc.height:
                continue
            locs = band.locs
            if b == b0 and start_row:  # only the locations whose patches reach start_row
                bottoms = torch.round((locs[:, 0] + 0.5) * s - f1 / 2) + f1
                locs = locs[bottoms > start_row]
            window = ahead.result()
            if b + 1 < len(bands):
                ahead = pool.submit(read, b + 1)
            if window is not None:
                origin = (band.top, plan.win_left)
                ex = PatchExtractor(window, pc, origin=origin, output_stride=model.output_stride)
                _segment_locations(model, ex, locs, w_map, ctx, acc, cfg)
                n_locs += len(locs)
            acc.flush(band.complete, sink, gaps=gaps)
    return n_locs


def _segment_locations(
    model: FoveatedSegmenter,
    ex: PatchExtractor,
    locs: torch.Tensor,
    w_map: torch.Tensor,
    ctx: MixContext,
    acc: _RowAccumulator,
    cfg: Config,
) -> None:
    """The segmenter on ``locs``' patch banks in batches; each location's probabilities, its
    smallest patch's area upsampled from the output stride, added into ``acc``."""
    s, f1 = cfg.patches.xr_scale, cfg.patches.fovs[0]
    device = acc.device
    for start in range(0, len(locs), cfg.inference.batch_size):
        lb = locs[start : start + cfg.inference.batch_size]
        bank = ex.bank(lb).to(device)
        wb = w_map[:, lb[:, 0].to(device), lb[:, 1].to(device)].T
        logits, _ = model(bank, wb, ctx)
        probs = torch.softmax(logits.float(), dim=1)
        probs = F.interpolate(probs, size=(f1, f1), mode="bilinear", align_corners=False)
        for (i, j), p in zip(lb.tolist(), probs, strict=True):
            acc.add(round((i + 0.5) * s - f1 / 2), round((j + 0.5) * s - f1 / 2), p)


def tile_edges(length: int, n_xr: int, cfg: Config, mode: str) -> list[int]:
    """Pixel positions along one axis where a tile's prediction starts or ends (inside the
    image): the lines a seam would follow (``foveation.metrics.seam_ratio``)."""
    s, f1 = cfg.patches.xr_scale, cfg.patches.fovs[0]
    edges = set()
    for i in grid_indices(n_xr, length, cfg, mode):
        start = round((i + 0.5) * s - f1 / 2)
        edges.update(e for e in (start, start + f1) if 0 < e < length)
    return sorted(edges)


def forward_pixels(height: int, width: int, cfg: Config, mode: str) -> int:
    """Segmenter input pixels that ``segment`` spends on an image, without running it."""
    s = cfg.patches.xr_scale
    h, w = xr_shape(height, width, s)
    n = len(grid_indices(h, height, cfg, mode)) * len(grid_indices(w, width, cfg, mode))
    return n * cfg.patches.patch_size**2
