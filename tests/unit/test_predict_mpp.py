"""Physical scale in prediction: a model trained at 0.5 um/px predicts a 40x (0.25 um/px) and a
20x scan of the same tissue alike, with GeoJSON in each slide's own level-0 pixels."""

import dataclasses
import json
from pathlib import Path

import pytest
import pyvips
import torch
import torch.nn.functional as F
from shapely.geometry import shape

from foveation.checkpoint import load_checkpoint
from foveation.data.synthetic import TissueScales, generate_slide
from foveation.inference.outputs import predict_slide
from foveation.io import storage
from foveation.io.slides import SlideError
from tests.vendor_slides import write_svs

CHECKPOINT = str(Path(__file__).parent.parent / "fixtures" / "checkpoint-48f8459")


def test_a_40x_and_a_20x_scan_predict_alike_at_the_models_mpp(tmp_path):
    model, cfg, _ = load_checkpoint(CHECKPOINT)
    cfg = dataclasses.replace(cfg, patches=dataclasses.replace(cfg.patches, mpp=0.5))
    tissue = generate_slide(768, 640, TissueScales.from_patches(cfg.patches), 7).image
    half = F.avg_pool2d(torch.from_numpy(tissue).permute(2, 0, 1)[None].float(), 2)[0]
    half = half.permute(1, 2, 0).round().to(torch.uint8).numpy()
    write_svs(str(tmp_path / "x40.svs"), tissue, mpp=0.25)
    write_svs(str(tmp_path / "x20.svs"), half, mpp=0.5)
    out = {}
    for name in ("x40", "x20"):
        res, summary = predict_slide(
            model, cfg, str(tmp_path / f"{name}.svs"), str(tmp_path / name)
        )
        labels = pyvips.Image.new_from_file(res["labels"].removeprefix("file://"), page=0).numpy()
        coll = json.loads(storage.read_bytes(res["geojson"]))
        out[name] = (labels, summary, sum(shape(f["geometry"]).area for f in coll["features"]))
    (l40, s40, a40), (l20, s20, a20) = out["x40"], out["x20"]
    assert s40["scale"] == 0.5 and s20["scale"] == 1.0 and s40["model_mpp"] == 0.5
    assert s40["slide_mpp"] == 0.25 and s20["slide_mpp"] == 0.5
    assert l40.shape == l20.shape == (384, 320)  # both at the model's 0.5 um/px
    assert (l40 == l20).mean() >= 0.95
    assert a40 == 768 * 640 and a20 == 384 * 320  # GeoJSON in each slide's level-0 px
    # A slide that gives no mpp is refused with how to give it, never resampled by a guess;
    # given (a slide list's mpp column), it predicts as the 20x scan does.
    pyvips.Image.new_from_array(half).pngsave(str(tmp_path / "nompp.png"))
    with pytest.raises(SlideError, match=r"nompp.png: the slide gives no mpp.*mpp"):
        predict_slide(model, cfg, str(tmp_path / "nompp.png"), str(tmp_path / "nompp"))
    res, s = predict_slide(
        model, cfg, str(tmp_path / "nompp.png"), str(tmp_path / "nompp"), slide_mpp=0.5
    )
    assert s["slide_mpp"] == 0.5 and s["model_mpp"] == 0.5 and s["scale"] == 1.0
    labels = pyvips.Image.new_from_file(res["labels"].removeprefix("file://"), page=0).numpy()
    assert (labels == l20).all()
