"""The synthetic generator's promises, measured on what it makes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from foveation.config import PatchSetConfig
from foveation.data.staple import staple
from foveation.data.synthetic import (
    CUE_OF_CLASS,
    GeneratorParams,
    TissueScales,
    annotate,
    generate_slide,
    make_annotators,
)

PC = PatchSetConfig(fovs=(64, 128, 256), patch_size=64, xr_scale=16)
SCALES = TissueScales.from_patches(PC)


@pytest.fixture(scope="module")
def slides():
    return [generate_slide(1024, 1024, SCALES, seed=s) for s in range(6)]


def windows_inside(slide, cls, size, max_n=400):
    """Top-left corners of aligned size x size windows wholly inside class ``cls``."""
    t = torch.from_numpy((slide.truth == cls).astype(np.float32))[None, None]
    full = F.avg_pool2d(t, size, stride=size // 2)[0, 0] == 1
    ys, xs = torch.nonzero(full, as_tuple=True)
    return [(int(y) * (size // 2), int(x) * (size // 2)) for y, x in zip(ys, xs, strict=True)][
        :max_n
    ]


def luminance(img):
    return img.astype(np.float32).mean(-1)


def local_stats(slides, cls, size):
    out = []
    for s in slides:
        for y, x in windows_inside(s, cls, size):
            w = s.image[y : y + size, x : x + size].astype(np.float32)
            lum = w.mean(-1)
            out.append([*w.mean((0, 1)), lum.std(), (lum > 235).mean()])
    return np.array(out)


def block_energy(lum):
    """Median over aligned 2x2 blocks of the squared deviation from the block mean: energy above
    what 2x area downsampling keeps (the median so that nucleus and lumen edges do not dominate)."""
    H, W = (lum.shape[0] // 2) * 2, (lum.shape[1] // 2) * 2
    b = lum[:H, :W].reshape(H // 2, 2, W // 2, 2)
    return float(np.median(((b - b.mean((1, 3), keepdims=True)) ** 2).mean((1, 3))))


def test_benign_and_grade3_look_the_same_at_the_smallest_fov(slides):
    a, b = local_stats(slides, 0, 64), local_stats(slides, 1, 64)
    assert len(a) > 30 and len(b) > 30
    ma, mb = a.mean(0), b.mean(0)
    # mean R, G, B within 2 grey levels; luminance spread and lumen fraction within 10%
    assert np.abs(ma[:3] - mb[:3]).max() < 2.0, (ma, mb)
    assert abs(ma[3] - mb[3]) / mb[3] < 0.1
    assert abs(ma[4] - mb[4]) / mb[4] < 0.15


def orientational_order(points, centre, size):
    """|mean exp(6i theta)| of nearest-neighbour bonds of glands inside a window: ~1 on a
    hexagonal lattice, small for random placement, once the window holds many glands."""
    inside = np.all(np.abs(points - centre) < size / 2, axis=1)
    p = points[inside]
    if len(p) < 3:
        return None
    d = ((p[:, None] - p[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn = p[d.argmin(1)] - p
    return float(np.abs(np.exp(6j * np.arctan2(nn[:, 0], nn[:, 1])).mean()))


def order_at(slides, cls, size):
    vals = []
    for s in slides:
        for y, x in windows_inside(s, cls, size, max_n=50):
            v = orientational_order(s.glands[cls], np.array([y + size / 2, x + size / 2]), size)
            if v is not None:
                vals.append(v)
    return np.array(vals)


def test_benign_and_grade3_differ_in_arrangement_at_the_large_fov(slides):
    lattice, random = order_at(slides, 1, 256), order_at(slides, 0, 256)
    assert len(lattice) > 5 and len(random) > 5
    assert lattice.mean() > 0.7 and random.mean() < 0.4, (lattice.mean(), random.mean())


def test_grade4_texture_lives_only_above_what_downsampling_keeps(slides):
    def energies(cls, factor):
        vals = []
        for s in slides:
            for y, x in windows_inside(s, cls, 64, max_n=100):
                lum = luminance(s.image[y : y + 64, x : x + 64])
                if factor > 1:
                    lum = F.avg_pool2d(torch.from_numpy(lum)[None, None], factor)[0, 0].numpy()
                vals.append(block_energy(lum))
        return np.mean(vals)

    full3, full4 = energies(1, 1), energies(2, 1)
    down3, down4 = energies(1, 4), energies(2, 4)
    assert full4 > 1.5 * full3, (full3, full4)  # visible at full resolution...
    assert abs(down4 - down3) / down3 < 0.1, (down3, down4)  # ...gone after 4x area downsampling
    # and as weak as tissue makes it: the texture's own energy is about the noise's
    assert full4 - full3 < 2.0 * full3


def test_class_fractions_and_cue_map(slides):
    frac = np.mean([np.bincount(s.truth.ravel(), minlength=4) / s.truth.size for s in slides], 0)
    assert 0.005 < frac[3] < 0.05, frac  # grade 5 is rare, about 2%
    assert all(0.1 < f < 0.6 for f in frac[:3]), frac
    none = generate_slide(512, 512, SCALES, seed=1, params=GeneratorParams(grade5_fraction=0.0))
    assert (none.truth != 3).all()
    for s in slides:
        assert np.array_equal(s.cue, CUE_OF_CLASS[s.truth])
        assert len(np.unique(s.truth)) >= 2  # every slide holds several classes


def test_deterministic_in_the_seed():
    a = generate_slide(256, 300, SCALES, seed=11)
    b = generate_slide(256, 300, SCALES, seed=11)
    c = generate_slide(256, 300, SCALES, seed=12)
    assert a.image.shape == (256, 300, 3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.truth, b.truth)
    assert not np.array_equal(a.image, c.image)


def test_annotators_err_as_specified_and_staple_beats_the_average_annotator(slides):
    annotators = make_annotators(0)
    assert len(annotators) == 6
    assert all(3 <= a.shift_px <= 30 and 0.02 <= a.confusion <= 0.15 for a in annotators)
    fused_acc, ann_acc = [], []
    for i, s in enumerate(slides):
        maps = [annotate(s, a, i) for a in annotators[: 3 + i % 4]]
        agree = [(m == s.truth).mean() for m in maps]
        assert all(0.6 < g < 1.0 for g in agree)  # they err, but they are experts
        fused_acc.append((staple(maps, 4) == s.truth).mean())
        ann_acc.append(np.mean(agree))
    assert np.mean(fused_acc) > np.mean(ann_acc)


# -- the informative regime -------------------------------------------------------------------

INFORMATIVE = GeneratorParams(regime="informative")


@pytest.fixture(scope="module")
def informative():
    return [generate_slide(768, 768, SCALES, seed=s, params=INFORMATIVE) for s in range(4)]


def test_informative_class_and_cue_are_balanced_and_independent(informative):
    for s in informative:
        assert s.region_cue is not None
        assert np.array_equal(s.cue, s.region_cue[s.regions])
        pairs = {(int(c), int(q)) for c, q in zip(s.region_class, s.region_cue, strict=True)}
        # about 6 regions a slide: every (class, cue) pair of benign/G3/G4 x context/texture
        assert {(c, q) for c, q in pairs if c < 3} == {(c, q) for c in range(3) for q in (0, 1)}
        assert all(q == 2 for c, q in pairs if c == 3)


def test_informative_gland_density_follows_the_cue_not_the_class(informative):
    count, area = np.zeros((3, 2)), np.zeros((3, 2))
    for s in informative:
        for k, p in s.glands.items():
            q = s.cue[p[:, 0].astype(int), p[:, 1].astype(int)]
            for c in (0, 1):
                count[k, c] += (q == c).sum()
                area[k, c] += ((s.truth == k) & (s.cue == c)).sum()
    dens = count / area
    for c in (0, 1):  # within a cue, the classes' densities agree within 8%
        assert dens[:, c].max() / dens[:, c].min() < 1.08, dens
    assert dens[:, 0].min() > 2 * dens[:, 1].max(), dens  # context: small dense; texture: sparse


def test_informative_textures_only_in_texture_regions_and_only_at_full_resolution(informative):
    def energy(cls, cue, factor):
        vals = []
        for s in informative:
            inside = np.where(s.cue == cue, s.truth, 255)
            for y, x in windows_inside(type("S", (), {"truth": inside})(), cls, 64, max_n=30):
                lum = luminance(s.image[y : y + 64, x : x + 64])
                if factor > 1:
                    lum = F.avg_pool2d(torch.from_numpy(lum)[None, None], factor)[0, 0].numpy()
                vals.append(block_energy(lum))
        return np.mean(vals)

    # (that downsampling removes them: the largest-FoV probe in test_synthetic_premise.py)
    e = {(k, q, f): energy(k, q, f) for k in range(3) for q in (0, 1) for f in (1,)}
    for cls in (1, 2):
        assert e[cls, 1, 1] > 1.5 * e[0, 1, 1]  # grade 3 / 4 in texture regions: visible
        assert e[cls, 0, 1] < 1.2 * e[0, 0, 1]  # context regions: no texture


def test_unknown_regime_is_refused():
    with pytest.raises(ValueError, match="regime"):
        generate_slide(128, 128, SCALES, seed=0, params=GeneratorParams(regime="nope"))
