"""The tile-at-a-time pyramid writer (``io.tilepyramid``): what it writes is what libvips and
the slide reader read back, level by level."""

import numpy as np
import pytest

from foveation.io.slides import SlideReader
from foveation.io.tilepyramid import level_sizes, reduce_mean, reduce_mode, write_tile_pyramid


def _tiles(a: np.ndarray, t: int):
    for r in range(0, a.shape[0], t):
        for c in range(0, a.shape[1], t):
            yield a[r : r + t, c : c + t]


def test_level_sizes_halve_rounding_up_until_one_tile():
    assert level_sizes(700, 1100, 256) == [(700, 1100), (350, 550), (175, 275), (88, 138)]
    assert level_sizes(200, 100, 256) == [(200, 100)]


def test_mode_keeps_the_majority_and_never_blends_ids():
    block = np.array([[1, 2, 3, 3], [2, 2, 4, 5]], np.uint8)
    assert reduce_mode(block).tolist() == [[2, 3]]
    rng = np.random.default_rng(0)
    b = rng.integers(0, 3, (64, 64), dtype=np.uint8)
    out = reduce_mode(b)
    quads = np.stack([b[0::2, 0::2], b[0::2, 1::2], b[1::2, 0::2], b[1::2, 1::2]], -1)
    counts = (quads == out[..., None]).sum(-1)
    assert (counts >= 1).all()  # always one of the four
    most = np.max([(quads == v).sum(-1) for v in range(3)], axis=0)
    assert (counts[most >= 3] >= 3).all()  # a clear majority always wins


@pytest.mark.parametrize("compression", ["deflate", "jpeg"])
def test_levels_read_back_as_written_with_the_physical_scale(tmp_path, compression):
    H, W, t = 700, 1100, 256
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([(xx // 5) % 256, (yy // 3) % 256, ((xx + yy) // 7) % 256], -1)
    img = img.astype(np.uint8)
    path = str(tmp_path / f"p-{compression}.tif")
    write_tile_pyramid(path, H, W, 3, _tiles(img, t), tile=t, compression=compression, mpp=0.5)
    r = SlideReader(path)
    assert [(lv.height, lv.width) for lv in r.levels] == level_sizes(H, W, t)
    assert r.mpp == pytest.approx(0.5)
    tol = 0 if compression == "deflate" else 2  # jpeg: mean error
    err = np.abs(r.read_level(0, 0, 0, H, W).astype(int) - img)
    assert err.mean() <= tol
    level1 = reduce_mean(img[: H // 2 * 2, : W // 2 * 2])
    err1 = np.abs(r.read_level(1, 0, 0, H // 2, W // 2).astype(int) - level1)
    assert err1.mean() <= tol


def test_labels_pyramid_is_lossless_and_counts_every_tile_once(tmp_path):
    H, W, t = 300, 520, 128
    lab = np.random.default_rng(1).integers(0, 4, (H, W), dtype=np.uint8)
    seen = np.zeros(256, np.int64)

    def count(tile):
        seen[:] += np.bincount(tile.reshape(-1), minlength=256)

    path = str(tmp_path / "labels.tif")
    write_tile_pyramid(path, H, W, 1, _tiles(lab, t), tile=t, reduce="mode", on_tile=count)
    r = SlideReader(path, rgb=False)
    assert np.array_equal(r.read_level(0, 0, 0, H, W).squeeze(), lab)
    assert np.array_equal(seen[:4], np.bincount(lab.reshape(-1), minlength=4))
    assert set(np.unique(r.read_level(1, 0, 0, H // 2, W // 2))) <= {0, 1, 2, 3}


def test_a_short_or_misshapen_tile_stream_is_an_error(tmp_path):
    img = np.zeros((300, 300, 3), np.uint8)
    with pytest.raises(ValueError, match="ended before tile"):
        write_tile_pyramid(str(tmp_path / "a.tif"), 300, 300, 3, [img[:256, :256]], tile=256)
    with pytest.raises(ValueError, match="expected"):
        write_tile_pyramid(str(tmp_path / "b.tif"), 300, 300, 3, [img[:200, :256]], tile=256)
