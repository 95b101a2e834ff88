"""Synthetic H&E-looking slides whose best field of view differs by location, by construction.

Scales come from the patch set (``TissueScales.from_patches``), so the debug and the paper
configs both get a meaningful set. F1 is the smallest FoV. Two regimes (``[data.synthetic]
regime``) share the building blocks below: glands (a white lumen ringed by nuclei) on a
lattice or placed at random, stroma with nuclei, colour drift, noise, and fine textures whose
energy lies only above what 2x area downsampling keeps (a random choice per aligned 2x2 block
among zero-mean 2x2 patterns, at a contrast near the noise level: only a full-resolution patch
sees them, and diluting them, as an averaged bank does, drowns them).

**blind** (the ablation in which the low-resolution view x_r cannot say where to look): the
cue follows the class, and benign, grade 3 and grade 4 look alike at x_r.

- **benign** and **grade 3** look the same locally: the same glands (the same size), stroma,
  nuclei, colours and noise. Grade 3 places its glands on a lattice (a random orientation per
  region), benign at random with the same density, so only a window of several glands (a
  large FoV) tells them apart. Cue: *context*.
- **grade 4** has grade 3's lattice and mean colour, plus the fine texture (all three
  patterns). Cue: *texture*.

**informative** (x_r says where to look, never what the class is): every region has a class
and, independently, a type, both balanced over a slide's regions. The type shows in the gland
architecture, which survives downsampling to x_r; within a type, the three classes share it.

- *context* regions: small glands (as in blind), packed. Benign places them at random,
  grade 3 on one lattice, grade 4 on a polycrystal: lattice domains about the middle FoV wide,
  each with its own orientation, so a smallest-FoV patch sees a lattice in both grades and only
  a window spanning several domains tells them apart. No fine texture.
- *texture* regions: large glands, sparse, placed at random in every class (paler and
  coarser at x_r). Benign has no fine texture, grade 3 the checkerboard pattern, grade 4 the
  two stripe patterns: only the smallest FoV's full-resolution pixels tell them apart.

In both regimes **grade 5** (about 2% of pixels) is solid sheets of packed nuclei, no glands,
visible at any FoV. Cue: *either*.

Regions are Voronoi cells from about the middle FoV to twice the largest, so every slide
holds several classes. Each slide comes with its true label map, its cue map (0 context,
1 texture, 2 either), and the maps of 3 to 6 of the data set's 6 simulated annotators, who
shift boundaries by a few to tens of pixels and confuse neighbouring grades at 2-15%.
``write_synthetic_set`` writes all of it in the Gleason2019 challenge's layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from foveation.config import SYNTHETIC_REGIMES, PatchSetConfig, SyntheticConfig
from foveation.io import storage

STROMA = np.array([232.0, 170.0, 200.0], np.float32)
NUCLEUS = np.array([105.0, 55.0, 150.0], np.float32)
LUMEN = np.array([246.0, 240.0, 246.0], np.float32)

CUE_CONTEXT, CUE_TEXTURE, CUE_EITHER = 0, 1, 2
CUE_OF_CLASS = np.array([CUE_CONTEXT, CUE_CONTEXT, CUE_TEXTURE, CUE_EITHER], np.uint8)
"""The blind regime's cue of each class (the informative regime draws a region's cue instead)."""
REGIMES = SYNTHETIC_REGIMES

# Zero-mean 2x2 patterns of the fine textures: a checkerboard and two stripes.
TEXTURE_KERNELS = np.array([[[1, -1], [-1, 1]], [[1, 1], [-1, -1]], [[1, -1], [1, -1]]], np.float32)
CHECKER, STRIPES, ALL_PATTERNS = (0,), (1, 2), (0, 1, 2)


@dataclass(frozen=True)
class TissueScales:
    """Pixel sizes of the tissue, derived from the patch set."""

    gland_spacing: float  # lattice spacing d; a smallest-FoV patch holds about 2-3 glands
    lumen_radius: float
    nucleus_radius: float
    region_min: float  # region (Voronoi cell) side range: about the middle FoV ...
    region_max: float  # ... to twice the largest
    grade5_radius: float
    sparse_spacing: float  # informative regime, texture regions: large glands, sparse ...
    sparse_lumen_radius: float  # ... (about 1.4x the lumen area fraction of context regions)
    domain_side: float  # informative regime, grade 4 context: lattice domains, about the middle FoV

    @classmethod
    def from_patches(cls, pc: PatchSetConfig) -> TissueScales:
        f1, fmid, fd = pc.fovs[0], pc.fovs[len(pc.fovs) // 2], pc.fovs[-1]
        d = 0.6 * f1
        return cls(
            gland_spacing=d,
            lumen_radius=0.22 * d,
            nucleus_radius=max(1.5, f1 / 48),
            region_min=float(fmid),
            region_max=2.0 * fd,
            grade5_radius=0.5 * fmid,
            sparse_spacing=1.6 * d,
            sparse_lumen_radius=0.42 * d,
            domain_side=float(fmid),
        )


@dataclass(frozen=True)
class GeneratorParams:
    grade5_fraction: float = 0.02
    texture_contrast: float = 1.0  # fine-texture amplitude, in units of the luminance noise
    noise_sigma: float = 5.0
    stroma_nuclei_spacing: float = 9.0  # mean distance between stroma nuclei, in nucleus radii
    grade5_density: float = 6.0  # nuclei density of grade 5 relative to stroma
    regime: str = "blind"  # one of REGIMES


@dataclass
class SyntheticSlide:
    image: np.ndarray  # uint8 [H, W, 3]
    truth: np.ndarray  # uint8 [H, W], class ids 0..3
    cue: np.ndarray  # uint8 [H, W], CUE_*
    regions: np.ndarray  # int32 [H, W], region ids
    region_class: np.ndarray  # uint8 [R], class of each region
    glands: dict[int, np.ndarray]  # class -> gland centres [n, 2] (row, col), for statistics
    region_cue: np.ndarray | None = None  # uint8 [R], cue (CUE_*) of each region


# -- geometry helpers -----------------------------------------------------------------------


def _disc_offsets(radius: float) -> np.ndarray:
    r = math.ceil(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    m = yy**2 + xx**2 <= radius**2
    return np.stack([yy[m], xx[m]], 1)


def _stamp(
    img: np.ndarray, centres: np.ndarray, radius: float, colour, mask: np.ndarray | None = None
) -> None:
    """Paint discs of ``radius`` at ``centres`` [n, 2] (vectorised; clipped at the border)."""
    if len(centres) == 0:
        return
    off = _disc_offsets(radius)
    pts = (np.rint(centres).astype(np.int64)[:, None, :] + off[None]).reshape(-1, 2)
    H, W = img.shape[:2]
    ok = (pts[:, 0] >= 0) & (pts[:, 0] < H) & (pts[:, 1] >= 0) & (pts[:, 1] < W)
    pts = pts[ok]
    if mask is not None:
        mask[pts[:, 0], pts[:, 1]] = True
    else:
        img[pts[:, 0], pts[:, 1]] = colour


def _smooth_field(rng, shape: tuple[int, int], cell: float, channels: int = 1) -> np.ndarray:
    """Low-frequency noise: a coarse N(0, 1) grid bilinearly upsampled, [channels, H, W]."""
    H, W = shape
    gh, gw = max(2, math.ceil(H / cell) + 1), max(2, math.ceil(W / cell) + 1)
    g = torch.from_numpy(rng.standard_normal((1, channels, gh, gw)).astype(np.float32))
    up = F.interpolate(g, size=(H, W), mode="bilinear", align_corners=True)
    return up[0].numpy()


def hex_lattice(
    shape: tuple[int, int], spacing: float, angle: float, offset: np.ndarray
) -> np.ndarray:
    """Points of a hexagonal lattice covering ``shape``, rotated by ``angle``, [n, 2]."""
    H, W = shape
    R = math.hypot(H, W)
    n = int(R / spacing) + 2
    i, j = np.mgrid[-n : n + 1, -n : n + 1]
    x = (i + 0.5 * (j % 2)) * spacing
    y = j * spacing * math.sqrt(3) / 2
    c, s = math.cos(angle), math.sin(angle)
    pts = np.stack([x * s + y * c, x * c - y * s], -1).reshape(-1, 2) + offset
    ok = (pts[:, 0] >= 0) & (pts[:, 0] < H) & (pts[:, 1] >= 0) & (pts[:, 1] < W)
    return pts[ok]


def random_hardcore(rng, shape: tuple[int, int], count: int, min_dist: float) -> np.ndarray:
    """``count`` uniform points at least ``min_dist`` apart (random sequential adsorption)."""
    H, W = shape
    cell = min_dist / math.sqrt(2)
    gh, gw = int(H / cell) + 1, int(W / cell) + 1
    grid = -np.ones((gh, gw), np.int64)
    pts: list[tuple[float, float]] = []
    tries = 0
    while len(pts) < count and tries < 30 * count + 100:
        batch = rng.uniform((0, 0), (H, W), size=(256, 2))
        for y, x in batch:
            tries += 1
            gy, gx = int(y / cell), int(x / cell)
            ok = True
            for yy in range(max(0, gy - 2), min(gh, gy + 3)):
                for xx in range(max(0, gx - 2), min(gw, gx + 3)):
                    k = grid[yy, xx]
                    if k >= 0 and (pts[k][0] - y) ** 2 + (pts[k][1] - x) ** 2 < min_dist**2:
                        ok = False
                        break
                if not ok:
                    break
            if ok:
                grid[gy, gx] = len(pts)
                pts.append((y, x))
                if len(pts) >= count:
                    break
    return np.array(pts, np.float64).reshape(-1, 2)


def _voronoi(rng, shape: tuple[int, int], side: float, step: int) -> np.ndarray:
    """Region ids [H, W] of Voronoi cells of mean side ``side``, boundaries wobbled by smooth
    noise; computed on a grid of ``step`` px and upsampled (nearest)."""
    H, W = shape
    n = max(2, round(H * W / side**2))
    seeds = torch.from_numpy(rng.uniform((0, 0), (H, W), size=(n, 2)).astype(np.float32))
    h, w = math.ceil(H / step), math.ceil(W / step)
    yy = (torch.arange(h, dtype=torch.float32) + 0.5) * step
    xx = (torch.arange(w, dtype=torch.float32) + 0.5) * step
    d = (yy[None, :, None] - seeds[:, 0, None, None]) ** 2 + (
        xx[None, None, :] - seeds[:, 1, None, None]
    ) ** 2
    wobble = torch.from_numpy(_smooth_field(rng, (h, w), max(2.0, side / (3 * step)), n)) * (
        0.15 * side
    )
    ids = (d.sqrt() + wobble).argmin(0).numpy().astype(np.int32)
    return np.repeat(np.repeat(ids, step, 0), step, 1)[:H, :W]


def polycrystal(
    rng, shape: tuple[int, int], spacing: float, domain_side: float, min_dist: float
) -> np.ndarray:
    """Points of hexagonal lattices in Voronoi domains of mean side ``domain_side``, each with
    its own orientation and offset, [n, 2]; across a domain wall, of two points closer than
    ``min_dist`` the one of the later domain goes."""
    H, W = shape
    dom = _voronoi(rng, shape, domain_side, step=max(1, round(spacing / 4)))
    pts, owner = [], []
    for k in range(int(dom.max()) + 1):
        p = hex_lattice(shape, spacing, rng.uniform(0, math.pi / 3), rng.uniform(0, spacing, 2))
        p = p + rng.normal(0, 0.06 * spacing, p.shape)
        ii = np.clip(p.astype(np.int64), 0, [H - 1, W - 1])
        p = p[dom[ii[:, 0], ii[:, 1]] == k]
        pts.append(p)
        owner.append(np.full(len(p), k))
    p, o = np.concatenate(pts), np.concatenate(owner)
    clash = torch.cdist(torch.from_numpy(p), torch.from_numpy(p)).numpy() < min_dist
    return p[~(clash & (o[None, :] < o[:, None])).any(1)]


def block_texture(rng, shape: tuple[int, int], patterns: tuple[int, ...]) -> np.ndarray:
    """A fine texture [H, W] of unit amplitude: per aligned 2x2 block, one of the
    ``TEXTURE_KERNELS`` ``patterns`` at random, with a random sign; zero mean over every block."""
    H, W = shape
    hb, wb = (H + 1) // 2, (W + 1) // 2
    kernels = TEXTURE_KERNELS[list(patterns)]
    pick = (
        kernels[rng.integers(0, len(patterns), (hb, wb))]
        * rng.choice([-1.0, 1.0], (hb, wb))[..., None, None]
    )
    return pick.transpose(0, 2, 1, 3).reshape(2 * hb, 2 * wb)[:H, :W]


# -- the generator --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """A slide's regions and what each one is: what placing the glands and painting start from."""

    regions: np.ndarray  # int32 [H, W], region ids; grade 5's sheets the last one, if any
    region_class: np.ndarray  # uint8 [R]
    region_cue: np.ndarray  # uint8 [R]
    n_tissue: int  # the Voronoi regions (those before grade 5's), where glands are placed
    g5: np.ndarray  # bool [H, W], grade 5's sheets
    n5: int  # how many sheets were drawn (0: no grade 5 region)


@dataclass(frozen=True)
class _Glands:
    """Gland centres [n, 2] (row, col) as placed, before grade 5's sheets cover some."""

    by_class: dict[int, np.ndarray]  # class -> every region's centres
    dense: list[np.ndarray]  # small glands, per region (informative: context regions)
    sparse: list[np.ndarray]  # large glands, per region (informative: texture regions)


def generate_slide(
    height: int,
    width: int,
    scales: TissueScales,
    seed: int,
    params: GeneratorParams = GeneratorParams(),
) -> SyntheticSlide:
    """One synthetic slide of ``params.regime``, deterministic in ``seed``. Every step draws
    from one generator, in a fixed order (regions, grade 5, glands, paint, textures and noise):
    a step drawing differently would change every later one, so a seed's slide would change."""
    if params.regime not in REGIMES:
        raise ValueError(f"regime: must be one of {REGIMES}, got {params.regime!r}")
    informative = params.regime == "informative"
    rng = np.random.default_rng(seed)
    layout = _layout(rng, (height, width), scales, params, informative)
    truth = layout.region_class[layout.regions]
    cue = layout.region_cue[layout.regions]
    glands = _place_glands(rng, layout, scales, informative)
    img, gland_pts = _paint(rng, layout, glands, scales, params, informative)
    image = _textures_and_noise(rng, img, truth, cue, params, informative)
    return SyntheticSlide(
        image, truth, cue, layout.regions, layout.region_class, gland_pts, layout.region_cue
    )


def _layout(
    rng, shape: tuple[int, int], scales: TissueScales, params: GeneratorParams, informative: bool
) -> _Layout:
    """Voronoi regions about the middle FoV to twice the largest, their classes and cues, and
    grade 5's sheets laid over them as one more region."""
    H, W = shape
    side = float(np.clip(min(H, W) / 2.5, scales.region_min, scales.region_max))
    regions = _voronoi(rng, shape, side, step=max(1, round(scales.gland_spacing / 8)))
    n_reg = int(regions.max()) + 1
    region_class, region_cue = _region_classes(rng, n_reg, informative)
    g5, n5 = _grade5_sheets(rng, shape, scales, params)
    if n5:
        regions = np.where(g5, n_reg, regions)
        region_class = np.append(region_class, np.uint8(3))
        region_cue = np.append(region_cue, np.uint8(CUE_EITHER))
    return _Layout(regions, region_class, region_cue, n_reg, g5, n5)


def _region_classes(rng, n_reg: int, informative: bool) -> tuple[np.ndarray, np.ndarray]:
    """(class, cue) of each region, uint8 [n_reg] each."""
    if informative:
        # Every (class, cue) pair in turn, shuffled: class and cue balanced and independent.
        pair = (rng.permutation(n_reg) + rng.integers(0, 6)) % 6
        region_class = (pair % 3).astype(np.uint8)
        region_cue = np.where(pair < 3, CUE_CONTEXT, CUE_TEXTURE).astype(np.uint8)
        return region_class, region_cue
    # Benign, grade 3 and grade 4 in equal shares; at least two classes when there are two
    # cells.
    region_class = rng.integers(0, 3, n_reg).astype(np.uint8)
    if n_reg >= 2 and len(set(region_class.tolist())) == 1:
        region_class[rng.integers(0, n_reg)] = (region_class[0] + 1 + rng.integers(0, 2)) % 3
    return region_class, CUE_OF_CLASS[region_class]


def _grade5_sheets(
    rng, shape: tuple[int, int], scales: TissueScales, params: GeneratorParams
) -> tuple[np.ndarray, int]:
    """Grade 5 sheets: discs whose expected total area is grade5_fraction of the slide; (their
    mask [H, W], how many)."""
    H, W = shape
    r5 = scales.grade5_radius
    n5 = rng.poisson(params.grade5_fraction * H * W / (math.pi * r5**2))
    g5 = np.zeros(shape, bool)
    for c in rng.uniform((0, 0), (H, W), size=(n5, 2)):
        _stamp(g5, c[None], r5 * rng.uniform(0.7, 1.3), True, mask=g5)
    return g5, n5


def _place_glands(rng, layout: _Layout, scales: TissueScales, informative: bool) -> _Glands:
    """Glands, region by region. Blind, and context regions: a lattice in grade 3 (grade 4:
    blind, the lattice; informative, lattice domains), random at the same density in benign.
    Informative texture regions: large sparse glands at random, whatever the class."""
    regions = layout.regions
    H, W = regions.shape
    glands: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}
    dense: list[np.ndarray] = []
    sparse: list[np.ndarray] = []
    for r in range(layout.n_tissue):
        cls = int(layout.region_class[r])
        box = _region_box(regions, r, scales.gland_spacing)
        if box is None:
            continue
        (y0, x0), size = box
        texture = informative and layout.region_cue[r] == CUE_TEXTURE
        pts = _region_glands(rng, size, cls, texture, informative, scales)
        pts = pts + np.array([y0, x0])
        pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < H) & (pts[:, 1] >= 0) & (pts[:, 1] < W)]
        ii = np.clip(pts.astype(np.int64), 0, [H - 1, W - 1])
        pts = pts[(regions[ii[:, 0], ii[:, 1]] == r)]
        glands[cls].append(pts)
        (sparse if texture else dense).append(pts)
    by_class = {k: (np.concatenate(v) if v else np.zeros((0, 2))) for k, v in glands.items()}
    return _Glands(by_class, dense, sparse)


def _region_box(
    regions: np.ndarray, r: int, spacing: float
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """((top, left), (height, width)) of a box around region ``r``, found on a grid of a
    quarter of the gland spacing; None when the grid misses the region."""
    H, W = regions.shape
    sub = max(1, int(spacing / 4))
    ys, xs = np.nonzero(regions[::sub, ::sub] == r)
    if len(ys) == 0:
        return None
    y0, x0 = max(0, ys.min() * sub - sub), max(0, xs.min() * sub - sub)
    box = (min(H, ys.max() * sub + 2 * sub) - y0, min(W, xs.max() * sub + 2 * sub) - x0)
    return (y0, x0), box


def _region_glands(
    rng,
    box: tuple[int, int],
    cls: int,
    texture: bool,
    informative: bool,
    scales: TissueScales,
) -> np.ndarray:
    """Gland centres [n, 2] over a region's ``box`` (in the box's coordinates)."""
    d, rn = scales.gland_spacing, scales.nucleus_radius
    if texture:
        ds, rls = scales.sparse_spacing, scales.sparse_lumen_radius
        sparse_density = 2 / (math.sqrt(3) * ds * ds)
        sparse_min = 2 * (rls + 2.2 * rn) + rn  # rims do not touch
        count = int(rng.poisson(sparse_density * box[0] * box[1]))
        return random_hardcore(rng, box, count, sparse_min)
    if informative and cls == 2:
        # 4% tighter: makes up for the glands lost at domain walls, so the density (x_r's
        # mean tone) matches the other classes'
        return polycrystal(rng, box, 0.96 * d, scales.domain_side, 0.6 * d)
    if cls in (1, 2):
        pts = hex_lattice(box, d, rng.uniform(0, math.pi / 3), rng.uniform(0, d, 2))
        return pts + rng.normal(0, 0.06 * d, pts.shape)
    density = 2 / (math.sqrt(3) * d * d)
    return random_hardcore(rng, box, int(rng.poisson(density * box[0] * box[1])), 0.6 * d)


def _paint(
    rng,
    layout: _Layout,
    glands: _Glands,
    scales: TissueScales,
    params: GeneratorParams,
    informative: bool,
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Stroma with colour drift, stroma nuclei (denser in grade 5), then the glands grade 5's
    sheets leave: (the image [H, W, 3] float32 before textures and noise, those glands by
    class)."""
    shape = layout.regions.shape
    d, rn = scales.gland_spacing, scales.nucleus_radius
    drift = _smooth_field(rng, shape, 8 * d, 3).transpose(1, 2, 0) * 5.0
    img = STROMA[None, None] + drift
    nuc = _stroma_nuclei(rng, layout, params.stroma_nuclei_spacing * rn, params.grade5_density)
    by_class, sizes = _glands_outside_grade5(glands, layout.g5, scales, informative)
    _stamp(img, nuc, rn, NUCLEUS)
    for pts, lr in sizes:
        _stamp(img, pts, lr + 2.2 * rn, STROMA + 8.0)  # a paler rim around each gland
    for pts, lr in sizes:
        ring_r = lr + 1.2 * rn
        n_ring = max(6, round(2 * math.pi * ring_r / (2.3 * rn)))
        phase = rng.uniform(0, 2 * math.pi, (len(pts), 1))
        ang = phase + np.arange(n_ring)[None] * 2 * math.pi / n_ring
        ring = pts[:, None, :] + ring_r * np.stack([np.sin(ang), np.cos(ang)], -1)
        _stamp(img, ring.reshape(-1, 2), rn, NUCLEUS)
    for pts, lr in sizes:
        _stamp(img, pts, lr, LUMEN)
    return img, by_class


def _stroma_nuclei(rng, layout: _Layout, spacing: float, grade5_density: float) -> np.ndarray:
    """Nucleus centres [n, 2]: uniform at ``spacing``, plus grade 5's extra density inside its
    sheets."""
    H, W = layout.regions.shape
    n_nuc = rng.poisson(H * W / spacing**2)
    nuc = rng.uniform((0, 0), (H, W), size=(n_nuc, 2))
    if layout.n5:
        extra = rng.uniform(
            (0, 0), (H, W), size=(rng.poisson(H * W * (grade5_density - 1) / spacing**2), 2)
        )
        ii = extra.astype(np.int64)
        nuc = np.concatenate([nuc, extra[layout.g5[ii[:, 0], ii[:, 1]]]])
    return nuc


def _glands_outside_grade5(
    glands: _Glands, g5: np.ndarray, scales: TissueScales, informative: bool
) -> tuple[dict[int, np.ndarray], list[tuple[np.ndarray, float]]]:
    """The glands grade 5's sheets do not cover: (by class, and as (centres, lumen radius) of
    each gland size)."""
    H, W = g5.shape

    def outside_g5(p: np.ndarray) -> np.ndarray:
        jj = np.clip(p.astype(np.int64), 0, [H - 1, W - 1])
        return p[~g5[jj[:, 0], jj[:, 1]]]

    all_glands = outside_g5(np.concatenate(list(glands.by_class.values())))
    by_class = {k: outside_g5(v) for k, v in glands.by_class.items()}
    rl = scales.lumen_radius
    if not informative:
        return by_class, [(all_glands, rl)]
    big = outside_g5(np.concatenate(glands.sparse)) if glands.sparse else np.zeros((0, 2))
    small = outside_g5(np.concatenate(glands.dense)) if glands.dense else np.zeros((0, 2))
    return by_class, [(small, rl), (big, scales.sparse_lumen_radius)]


def _textures_and_noise(
    rng,
    img: np.ndarray,
    truth: np.ndarray,
    cue: np.ndarray,
    params: GeneratorParams,
    informative: bool,
) -> np.ndarray:
    """Fine textures (zero mean over every aligned 2x2 block, near the noise level; blind:
    grade 4, all patterns; informative: texture regions' grade 3, the checkerboard, and grade
    4, the stripes), then luminance and chroma noise; the image as uint8 [H, W, 3]."""
    shape = truth.shape
    H, W = shape
    sigma = params.noise_sigma
    amp = params.texture_contrast * sigma
    if informative:
        for cls, patterns in ((1, CHECKER), (2, STRIPES)):
            where = (truth == cls) & (cue == CUE_TEXTURE)
            if where.any():
                img += (amp * block_texture(rng, shape, patterns) * where)[..., None]
    elif (truth == 2).any():
        img += (amp * block_texture(rng, shape, ALL_PATTERNS) * (truth == 2))[..., None]
    img += rng.normal(0, sigma, (H, W, 1)).astype(np.float32)  # luminance noise
    img += rng.normal(0, 0.4 * sigma, (H, W, 3)).astype(np.float32)  # chroma noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# -- simulated annotators -------------------------------------------------------------------


@dataclass(frozen=True)
class Annotator:
    index: int
    shift_px: float  # typical boundary displacement
    confusion: float  # rate at which a region is called a neighbouring grade


def make_annotators(seed: int, n: int = 6) -> list[Annotator]:
    """A data set's annotators, each with its own skill (seeded)."""
    rng = np.random.default_rng(seed + 7_777_777)
    return [
        Annotator(i + 1, float(rng.uniform(3, 30)), float(rng.uniform(0.02, 0.15)))
        for i in range(n)
    ]


def annotate(slide: SyntheticSlide, who: Annotator, seed: int) -> np.ndarray:
    """One annotator's label map [H, W] uint8: regions relabelled to a neighbouring grade with
    probability ``confusion``, boundaries displaced by a smooth field of about ``shift_px``."""
    rng = np.random.default_rng(seed * 31 + who.index)
    cls = slide.region_class.astype(np.int64).copy()
    flip = rng.random(len(cls)) < who.confusion
    step = rng.choice([-1, 1], len(cls))
    cls = np.where(flip, np.clip(cls + step, 0, 3), cls)
    H, W = slide.truth.shape
    disp = _smooth_field(rng, (H, W), max(16.0, 6 * who.shift_px), 2) * who.shift_px
    yy = np.clip(np.arange(H)[:, None] + np.rint(disp[0]).astype(np.int64), 0, H - 1)
    xx = np.clip(np.arange(W)[None, :] + np.rint(disp[1]).astype(np.int64), 0, W - 1)
    return cls[slide.regions[yy, xx]].astype(np.uint8)


# -- the data set in the Gleason2019 layout ------------------------------------------------


SETTINGS_FILE = "synthetic.json"
"""Written last into a generated set's root: the settings it was generated with (so a set made
with other settings is regenerated rather than silently reused) and that it is complete."""


def generator_settings(cfg: SyntheticConfig, patches: PatchSetConfig) -> dict:
    """What determines a generated set's pixels: ``data.synthetic`` and the tissue scales'
    patch geometry (JSON types, so it compares equal to its stored copy)."""
    import dataclasses
    import json

    return json.loads(
        json.dumps(
            {
                "synthetic": dataclasses.asdict(cfg),
                "fovs": list(patches.fovs),
                "patch_size": patches.patch_size,
                "xr_scale": patches.xr_scale,
            }
        )
    )


def stored_settings(dest: str) -> dict | None:
    """The settings a generated set in ``dest`` was made with; None where there is no record."""
    import json

    uri = storage.join(dest, SETTINGS_FILE)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


def write_synthetic_set(
    dest: str, cfg: SyntheticConfig, patches: PatchSetConfig, log=print
) -> list[str]:
    """Generate ``cfg.n_slides`` slides into ``dest`` in the Gleason2019 layout (each slide by a
    random 3 to 6 of the set's annotators; true labels and cue maps beside), then the settings
    record (``SETTINGS_FILE``). Deterministic in ``cfg.seed``. Returns the slide ids."""
    import json

    from foveation.data import gleason
    from foveation.io.images import encode_jpeg, encode_png

    scales = TissueScales.from_patches(patches)
    params = GeneratorParams(
        cfg.grade5_fraction, cfg.texture_contrast, cfg.noise_sigma, regime=cfg.regime
    )
    annotators = make_annotators(cfg.seed, cfg.n_annotators)
    lo, hi = cfg.annotators_per_slide
    rng = np.random.default_rng(cfg.seed + 1)
    raw_lut = np.array([gleason.CLASS_TO_RAW[c] for c in range(4)], np.uint8)
    ids = []
    for i in range(cfg.n_slides):
        sid = gleason.slide_id(i)
        seed = cfg.seed * 1_000_003 + i
        s = generate_slide(cfg.size, cfg.size, scales, seed, params)
        k = int(rng.integers(lo, hi + 1))
        who = sorted(rng.choice(len(annotators), size=k, replace=False).tolist())
        ext = "png" if cfg.image_format == "png" else "jpg"
        data = encode_png(s.image) if ext == "png" else encode_jpeg(s.image, 95)
        storage.write_bytes(storage.join(dest, gleason.IMAGE_DIR, f"{sid}.{ext}"), data)
        for a in who:
            m = raw_lut[annotate(s, annotators[a], seed)]
            name = f"{sid}{gleason.MAP_SUFFIX}"
            storage.write_bytes(
                storage.join(dest, f"Maps{annotators[a].index}_T", name), encode_png(m)
            )
        storage.write_bytes(
            storage.join(dest, gleason.TRUTH_DIR, f"{sid}{gleason.TRUTH_SUFFIX}"),
            encode_png(s.truth),
        )
        storage.write_bytes(
            storage.join(dest, gleason.CUE_DIR, f"{sid}{gleason.CUE_SUFFIX}"), encode_png(s.cue)
        )
        ids.append(sid)
        log(f"  generated {sid} ({cfg.size} px, annotators {[annotators[a].index for a in who]})")
    settings = json.dumps(generator_settings(cfg, patches), indent=1).encode()
    storage.write_bytes(storage.join(dest, SETTINGS_FILE), settings)
    return ids
