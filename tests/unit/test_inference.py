import numpy as np
import pytest
import torch

from foveation.config import Config, InferenceConfig, replace
from foveation.inference import ArraySink, ArraySource, forward_pixels, segment
from foveation.inference.wholeslide import blend_window, tile_edges, xr_from_source
from foveation.metrics import seam_ratio
from foveation.models import FoveatedSegmenter
from foveation.patches import make_xr


class CountingSource(ArraySource):
    def __init__(self, image):
        super().__init__(image)
        self.max_rows = 0

    def read_region(self, top, left, height, width):
        self.max_rows = max(self.max_rows, height)
        return super().read_region(top, left, height, width)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FoveatedSegmenter(Config()).eval()


def img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("size", [(256, 256), (37, 100), (90, 20)])
@pytest.mark.parametrize("mode", ["tiled", "dense"])
def test_every_pixel_is_predicted_for_any_size(model, size, mode):
    sink = ArraySink(keep_probs=True)
    stats = segment(model, ArraySource(img(*size)), Config(), sink, mode=mode)
    assert sink.mask.shape == size and sink.rows_written == size[0]
    np.testing.assert_allclose(sink.probs.astype(np.float32).sum(0), 1.0, atol=2e-3)
    assert sink.apsm.shape == (-(-size[0] // 16), -(-size[1] // 16))
    assert (sink.apsm >= 64).all() and (sink.apsm <= 256).all()
    assert stats.forward_pixels == forward_pixels(*size, Config(), mode)


def test_tiled_spends_about_one_forward_pixel_per_output_pixel_and_overlap_its_square():
    flat = replace(Config(), inference=InferenceConfig(overlap=0.0))
    assert forward_pixels(1024, 1024, flat, "tiled") / 1024**2 <= 1.3
    assert forward_pixels(1024, 1024, flat, "dense") / 1024**2 == pytest.approx(16.0)
    cfg = Config()  # the default overlap of 0.25: about 1 / 0.75^2
    assert cfg.inference.overlap == 0.25
    assert 1.7 <= forward_pixels(1024, 1024, cfg, "tiled") / 1024**2 <= 1.9


def test_the_blend_window_falls_off_to_the_border_and_normalises_away(model):
    g = blend_window(32, "gaussian")
    assert g.shape == (32, 32) and torch.equal(g, g.T) and bool((g > 0).all())
    assert float(g[15, 15]) > 0.99 and float(g[0, 0]) < 0.01 and float(g[0, 15]) < 0.02
    assert torch.equal(blend_window(8, "flat"), torch.ones(8, 8))
    # Where tiles do not overlap the weights cancel: flat and Gaussian give the same map.
    image = img(96, 96, 3)
    out = {}
    for blend in ("flat", "gaussian"):
        cfg = replace(Config(), inference=InferenceConfig(overlap=0.0, blend=blend))
        out[blend] = ArraySink(keep_probs=True)
        segment(model, ArraySource(image), cfg, out[blend])
    np.testing.assert_allclose(
        out["flat"].probs.astype(np.float32), out["gaussian"].probs.astype(np.float32), atol=2e-3
    )


def test_seam_ratio_sees_a_seam_along_tile_edges_and_none_elsewhere():
    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 20:] = 1  # one true boundary, not on an edge
    edges = [16, 32, 48]
    clean = seam_ratio(mask, edges, edges)
    assert clean["across"] == 0 and clean["ratio"] == 0
    seamy = mask.copy()
    for e in edges:  # tiles disagree: the class flips along every tile edge
        seamy[:, e : e + 16] = rng.integers(0, 2)
        seamy[e : e + 16, :] ^= 1
    assert seam_ratio(seamy, edges, edges)["ratio"] > 5
    # Tiles of 64 px (the default's smallest FoV) every 64 px without overlap, every 48 with.
    flat = replace(Config(), inference=InferenceConfig(overlap=0.0))
    assert np.diff(tile_edges(1000, 63, flat, "tiled")).tolist() == [64] * 14
    assert set(np.diff(tile_edges(1000, 63, Config(), "tiled"))) == {16, 32}


def test_tiled_with_overlap_equals_itself_from_any_source_and_agrees_with_dense(model):
    image = img(200, 180, 1)
    cfg = replace(Config(), inference=InferenceConfig(overlap=0.5))
    a, b = ArraySink(keep_probs=True), ArraySink(keep_probs=True)
    segment(model, ArraySource(image), cfg, a)
    segment(model, CountingSource(image), cfg, b)
    assert np.array_equal(a.mask, b.mask)
    d = ArraySink()
    segment(model, ArraySource(image), cfg, d, mode="dense")
    assert (a.mask == d.mask).mean() > 0.5  # same model, same data: mostly the same answer


def test_memory_is_bounded_by_a_band_not_the_image_height(model):
    cfg = Config()
    src = CountingSource(img(1600, 48))
    sink = ArraySink()
    segment(model, src, cfg, sink)
    # x_r bands are 1024 rows; patch windows about two largest FoVs
    assert src.max_rows <= 1024
    tall = CountingSource(img(3200, 48))
    segment(model, tall, cfg, ArraySink())
    assert tall.max_rows == src.max_rows


def test_xr_from_source_equals_make_xr():
    image = img(1100, 70, 2)
    cfg = Config()
    whole = make_xr(torch.from_numpy(image).permute(2, 0, 1), 16, cfg.model.mean, cfg.model.std)
    torch.testing.assert_close(xr_from_source(ArraySource(image), cfg, band_px=512), whole)


def test_grayscale_and_rgba_inputs_are_converted(model):
    sink = ArraySink()
    segment(model, ArraySource(img(64, 64)[..., 0]), Config(), sink)
    assert sink.mask.shape == (64, 64)
    rgba = np.concatenate([img(64, 64), np.full((64, 64, 1), 255, np.uint8)], -1)
    segment(model, ArraySource(rgba), Config(), ArraySink())


class RecordingSource(ArraySource):
    def __init__(self, image):
        super().__init__(image)
        self.reads = []

    def read_region(self, top, left, height, width):
        self.reads.append((top, height))
        return super().read_region(top, left, height, width)


def test_glass_is_skipped_tissue_is_segmented_as_without_skipping(model):
    """A slide with tissue in rows 256..512 of 1024 and glass elsewhere: with a background
    threshold, glass far from tissue gets probabilities 0, bands of only glass are not read,
    fewer locations run, and tissue pixels get what they get without skipping."""
    image = np.full((1024, 256, 3), 250, np.uint8)
    image[256:512] = img(256, 256, 5) // 2  # dark: tissue
    full, skip = ArraySink(keep_probs=True), ArraySink(keep_probs=True)
    a = segment(model, ArraySource(image), Config(), full)
    src = RecordingSource(image)
    b = segment(model, src, Config(), skip, background=225.0)
    assert b.locations < a.locations / 2
    probs = skip.probs.astype(np.float32)
    np.testing.assert_allclose(probs[:, 256:512], full.probs[:, 256:512].astype(np.float32))
    assert (probs[:, :128] == 0).all() and (probs[:, 640:] == 0).all()
    assert np.allclose(probs[:, 256:512].sum(0), 1.0, atol=2e-3)
    windows = src.reads[1:]  # after the one read that makes x_r
    assert windows and max(top for top, _ in windows) < 768, windows  # nothing below is read
    assert min(top + height for top, height in windows) > 0
