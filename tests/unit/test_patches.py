"""Geometry and parity of the patch extractor, on images whose pixels encode coordinates."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from foveation.config import PatchSetConfig
from foveation.patches import (
    IGNORE_INDEX,
    PatchExtractor,
    all_locations,
    authors_loop_bank,
    location_centres,
    make_xr,
    pad_xr,
    xr_neighbourhoods,
    xr_shape,
)

CFG = PatchSetConfig(fovs=(64, 128, 256), patch_size=64, xr_scale=16)


def coord_image(h, w):
    """float32 [3, H, W]: row, col, and a constant 1 (to tell image from padding)."""
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    return torch.stack([yy, xx, torch.ones_like(yy)])


def border_locations(h, w, s):
    xh, xw = xr_shape(h, w, s)
    picks = {0, 1, xh // 2, xh - 2, xh - 1}
    pcks = {0, 1, xw // 2, xw - 2, xw - 1}
    return torch.tensor(
        [[i, j] for i in sorted(picks) for j in sorted(pcks) if 0 <= i < xh and 0 <= j < xw]
    )


@pytest.mark.parametrize("size", [(200, 168), (64, 48), (40, 300)])
def test_patches_are_centred_on_xr_pixel_centres_at_every_border(size):
    h, w = size
    ex = PatchExtractor.from_image(coord_image(h, w), CFG, pad_value=(0.0, 0.0, 0.0))
    locs = border_locations(h, w, CFG.xr_scale)
    bank = ex.bank(locs)
    assert bank.shape == (len(locs), 3, 3, 64, 64)
    centres = location_centres(locs, CFG.xr_scale)
    for n, (cy, cx) in enumerate(centres.tolist()):
        for d, fov in enumerate(CFG.fovs):
            k = fov // 64
            p = bank[n, d]
            inside = p[2] == 1  # area-pooled pixels wholly inside the image
            # output pixel (a, b) covers [c - F/2 + a k, + k): its mean row is that + (k - 1) / 2
            a = torch.arange(64, dtype=torch.float32)
            want_r = (cy - fov / 2 + a * k + (k - 1) / 2)[:, None].expand(64, 64)
            want_c = (cx - fov / 2 + a * k + (k - 1) / 2)[None, :].expand(64, 64)
            assert inside.any()
            torch.testing.assert_close(p[0][inside], want_r[inside])
            torch.testing.assert_close(p[1][inside], want_c[inside])
            # outside the image: exactly the pad value; at the rim: a partial mix
            fully_out = (want_r + (k - 1) / 2 < 0) | (want_r - (k - 1) / 2 > h - 1)
            fully_out |= (want_c + (k - 1) / 2 < 0) | (want_c - (k - 1) / 2 > w - 1)
            assert (p[2][fully_out] == 0).all()


def test_label_crop_lines_up_with_the_smallest_patch():
    """The batch's label pixel (a, b) is the 4 x 4 block at the smallest patch's pixel (4a, 4b);
    beyond the image, the ignore index."""
    from foveation.config import Config
    from foveation.data.batches import BatchExtractor

    h, w = 160, 176
    cfg = dataclasses.replace(Config(), patches=CFG)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    label = (((yy // 4) * 7 + (xx // 4)) % 4).to(torch.uint8)  # constant on aligned 4x4 blocks
    image = torch.full((h, w, 3), 128, dtype=torch.uint8)
    ex = BatchExtractor.from_arrays(cfg, image, label)
    locs = border_locations(h, w, CFG.xr_scale)
    lab = ex.labels(locs)
    assert lab.shape == (len(locs), 16, 16) and lab.dtype == torch.uint8
    f1 = CFG.fovs[0]
    for n, (cy, cx) in enumerate(location_centres(locs, CFG.xr_scale).tolist()):
        rows = round(cy - f1 / 2) + 4 * torch.arange(16)
        cols = round(cx - f1 / 2) + 4 * torch.arange(16)
        inside = ((rows >= 0) & (rows + 3 < h))[:, None] & ((cols >= 0) & (cols + 3 < w))[None]
        assert inside.any() and (rows % 4 == 0).all()
        want = (((rows // 4)[:, None] * 7 + (cols // 4)[None]) % 4).to(torch.uint8)
        assert (lab[n][inside] == want[inside]).all()
        assert (lab[n][~inside] == IGNORE_INDEX).all()


@pytest.mark.parametrize("fovs", [(64, 128, 256), (64, 96, 160, 250)])
def test_reference_mode_equals_the_authors_loop(fovs):
    cfg = PatchSetConfig(fovs=fovs, patch_size=64, xr_scale=16, resample="reference")
    g = torch.Generator().manual_seed(0)
    img = torch.rand((3, 150, 190), generator=g)
    locs = border_locations(150, 190, 16)
    ex = PatchExtractor.from_image(img, cfg, pad_value=(0.0, 0.0, 0.0))
    torch.testing.assert_close(ex.bank(locs), authors_loop_bank(img, locs, cfg), atol=1e-5, rtol=0)


def test_area_mode_is_area_correct():
    g = torch.Generator().manual_seed(1)
    img = torch.rand((3, 300, 300), generator=g)
    ex = PatchExtractor.from_image(img, CFG, pad_value=(0.0, 0.0, 0.0))
    loc = torch.tensor([[9, 9]])  # centre (152, 152), all patches inside
    bank = ex.bank(loc)
    for d, fov in enumerate(CFG.fovs):
        t = 152 - fov // 2
        crop = img[:, t : t + fov, t : t + fov]
        torch.testing.assert_close(bank[0, d], F.avg_pool2d(crop[None], fov // 64)[0])


def test_non_integer_ratio_is_antialiased_and_centred():
    cfg = PatchSetConfig(fovs=(64, 96, 160), patch_size=64, xr_scale=16)
    img = coord_image(256, 256)
    ex = PatchExtractor.from_image(img, cfg, pad_value=(0.0, 0.0, 0.0))
    p = ex.bank(torch.tensor([[8, 8]]))[0]  # centre (136, 136)
    for d in range(3):
        # a linear ramp survives any symmetric filter: the patch's centre is the location's
        assert p[d, 0, 31:33, :].mean().item() == pytest.approx(136 - 0.5, abs=0.05)
        assert p[d, 1, :, 31:33].mean().item() == pytest.approx(136 - 0.5, abs=0.05)


def test_uint8_in_uint8_out_and_mean_colour_padding():
    img = torch.full((3, 40, 40), 200, dtype=torch.uint8)
    ex = PatchExtractor.from_image(img, CFG, pad_value=(124, 116, 104))
    b = ex.bank(torch.tensor([[0, 0]]))
    assert b.dtype == torch.uint8
    assert b[0, 0, :, 0, 0].tolist() == [124, 116, 104]  # far outside: the mean colour
    assert b[0, 0, 0, 63, 63].item() == 200


def test_reflect_padding_handles_images_smaller_than_the_largest_fov():
    cfg = dataclasses.replace(CFG, padding="reflect")
    g = torch.Generator().manual_seed(2)
    img = torch.randint(0, 256, (3, 20, 30), generator=g, dtype=torch.uint8)
    ex = PatchExtractor.from_image(img, cfg, pad_value=(0, 0, 0))
    bank = ex.bank(all_locations(20, 30, 16))
    assert bank.shape == (4, 3, 3, 64, 64)
    # reflected, never the pad colour: every value of the full-resolution patch occurs in the image
    assert set(bank[:, 0].unique().tolist()) <= set(img.unique().tolist())


def test_xr_is_an_area_mean_and_neighbourhoods_match_the_whole_map():
    g = torch.Generator().manual_seed(3)
    img = torch.randint(0, 256, (3, 70, 50), generator=g, dtype=torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    xr = make_xr(img, 16, mean, std)
    assert xr.shape == (3, 5, 4)
    block = (img[:, :16, 16:32].float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(xr[:, 0, 1], block.mean((1, 2)))
    locs = all_locations(70, 50, 16)
    nb = xr_neighbourhoods(xr, locs)
    padded = pad_xr(xr)
    assert nb.shape == (20, 3, 7, 7)
    i, j = locs[7].tolist()
    torch.testing.assert_close(nb[7], padded[:, i : i + 7, j : j + 7])
    torch.testing.assert_close(nb[7, :, 3, 3], xr[:, i, j])
