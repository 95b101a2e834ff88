"""The memory loader's shard and the choice between streaming and memory (no Ray)."""

from __future__ import annotations

import dataclasses

import pytest
from metrics_helpers import recorded

from foveation.config import Config, ConfigError, PipelineConfig
from foveation.data.samples import choose_loader, shard


@pytest.mark.parametrize("n,world", [(7, 2), (8, 2), (3, 4), (1, 2), (10, 3)])
def test_every_rank_gets_the_same_number_of_slides_and_every_slide_is_trained(n, world):
    rows = list(range(n))
    shards = [shard(rows, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal steps: no rank waits in an all-reduce
    assert set().union(*map(set, shards)) == set(rows)
    if n % world == 0:  # no padding needed: a partition
        assert sorted(r for s in shards for r in s) == rows


def cfg_with(loader: str, limit_mb: float) -> Config:
    cfg = Config()
    pc = PipelineConfig(loader=loader, memory_limit_mb=limit_mb)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pipeline=pc))


def test_auto_holds_a_shard_in_memory_only_when_its_largest_possible_share_fits():
    rows = [{"width": 1024, "height": 1024}] * 6  # 4 MiB each decoded (RGB + label)
    assert choose_loader(cfg_with("auto", 24), rows, 1) == "memory"
    assert choose_loader(cfg_with("auto", 23), rows, 1) == "stream"
    assert choose_loader(cfg_with("auto", 12), rows, 2) == "memory"  # 3 slides a rank
    big = [*rows, {"width": 40_000, "height": 30_000}]  # one whole-slide image: 4.8 GB
    assert choose_loader(cfg_with("auto", 1024), big, 2) == "stream"
    assert choose_loader(cfg_with("stream", 1e9), rows, 1) == "stream"
    assert choose_loader(cfg_with("memory", 0), big, 1) == "memory"


def test_an_unknown_loader_names_the_field():
    with pytest.raises(ConfigError, match=r"data\.pipeline\.loader"):
        PipelineConfig(loader="disk")


def test_an_unreadable_slide_in_a_shard_is_skipped_and_the_shard_keeps_its_length(tmp_path):
    import numpy as np
    from PIL import Image

    from foveation.data.samples import load_shard
    from foveation.io.slides import SlideError

    rows = []
    for i in range(3):
        img, lab = tmp_path / f"s{i}.png", tmp_path / f"s{i}-label.png"
        Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(img)
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(lab)
        rows.append({"slide_id": f"s{i}", "image_uri": str(img), "label_uri": str(lab)})
    (tmp_path / "s1.png").write_bytes(b"not an image")
    samples, failed = load_shard(rows, "train", max_error_fraction=0.5)
    assert list(failed) == ["s1"] and "s1.png" in failed["s1"]
    assert [s.slide_id for s in samples] == ["s0", "s2", "s0"]  # equal steps on every rank
    with pytest.raises(SlideError, match=r"max_error_fraction"):
        load_shard(rows, "train", max_error_fraction=0.2)


def test_the_memory_loader_records_the_data_metrics_the_streamed_one_does(tmp_path):
    """The data dashboard reads foveation_data_*: the memory loader (the default on small sets)
    records them too: one read per slide and epoch with its banks and bytes, and skipped
    slides."""
    import numpy as np
    import pyvips

    from foveation.data.batches import BatchExtractor
    from foveation.data.samples import load_shard
    from foveation.io.slides import write_pyramid
    from foveation.training.loop import in_memory_batches

    cfg = Config()
    side = 4 * max(cfg.patches.fovs)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        img, lab = str(tmp_path / f"s{i}.tif"), str(tmp_path / f"s{i}-label.tif")
        pix = rng.integers(0, 200, (side, side, 3), dtype=np.uint8)
        write_pyramid(pyvips.Image.new_from_array(pix), img, 128, "deflate", sqrt2=False)
        labels = np.zeros((side, side, 1), np.uint8)
        write_pyramid(pyvips.Image.new_from_array(labels), lab, 128, "deflate", sqrt2=False)
        rows.append({"slide_id": f"s{i}", "image_uri": img, "label_uri": lab})
    rows.append({"slide_id": "bad", "image_uri": str(tmp_path / "none.tif"), "label_uri": ""})

    skipped0 = recorded("foveation_data_skipped_slides_total")
    samples, failed = load_shard(rows, "train", max_error_fraction=0.5, refill=False)
    assert list(failed) == ["bad"]
    assert recorded("foveation_data_skipped_slides_total") == skipped0 + 1
    # (what the decode fetched from object storage is recorded by the function the reader
    # actors use, data.readmetrics.record_storage; local files have no range files to count)

    ex = {s.slide_id: BatchExtractor.from_arrays(cfg, s.image, s.label) for s in samples}
    banks0, bytes0 = (
        recorded("foveation_data_patch_banks_total"),
        recorded("foveation_data_bank_bytes_total"),
    )
    reads0 = recorded("foveation_data_read_seconds_count")
    batches = list(in_memory_batches(ex, cfg, epoch=0))
    locations = sum(len(b["loc"]) for b in batches)
    assert locations > 0
    assert recorded("foveation_data_patch_banks_total") - banks0 == locations
    assert recorded("foveation_data_bank_bytes_total") - bytes0 == sum(
        b["bank"].numel() * b["bank"].element_size() for b in batches
    )
    assert recorded("foveation_data_read_seconds_count") - reads0 == 2  # one per slide
