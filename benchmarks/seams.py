"""The ``seams`` suite: does whole-slide inference leave a tile grid in the label map?

On a 1024 px informative synthetic slide (drawn like the model's training set, a seed it never
saw), predicted by a trained model (default: the demo's, ``runs/debug/runs/soft/model``, trained
first by ``jobs.demo`` where it is missing; set ``FOVEATION_SEAMS_MODEL`` to another
checkpoint), the class-disagreement rate of neighbouring
pixels across tile edges over that inside tiles (``foveation.metrics.seam_ratio``; 1 = no
seam) with the model's inference settings, against the baseline of abutting tiles averaged
flat (what inference did before the Gaussian blend), plus the forward cost of each. Target:
ratio <= 1.2. Seams do not depend on the machine's load, so this is one run, not repetitions.
"""

from __future__ import annotations

import dataclasses
import time

from benchmarks import Figure, demo_model
from foveation.config import Config


def _measure(model, cfg: Config, image, truth) -> dict:
    from foveation.inference import ArraySink, ArraySource, segment
    from foveation.inference.wholeslide import tile_edges
    from foveation.metrics import ConfusionMatrix, seam_ratio
    from foveation.patches import xr_shape

    h, w = xr_shape(*image.shape[:2], cfg.patches.xr_scale)
    sink = ArraySink()
    t = time.perf_counter()
    stats = segment(model, ArraySource(image, "seams"), cfg, sink)
    sec = time.perf_counter() - t
    edges_r = tile_edges(image.shape[0], h, cfg, cfg.inference.mode)
    edges_c = tile_edges(image.shape[1], w, cfg, cfg.inference.mode)
    cm = ConfusionMatrix(cfg.model.num_classes, 255)
    cm.update(sink.mask, truth)
    ev = cfg.evaluation
    return {
        **seam_ratio(sink.mask, edges_r, edges_c),
        "fpo": stats.forward_per_output,
        "seconds": sec,
        "miou": cm.summary(ev.kept_classes, ev.class_names)["miou_kept"],
    }


def run(config: str, quick: bool = False) -> list[Figure]:
    import torch

    from foveation.checkpoint import load_checkpoint
    from foveation.data.synthetic import GeneratorParams, TissueScales, generate_slide

    uri = demo_model("FOVEATION_SEAMS_MODEL", quick)
    torch.set_num_threads(1)
    model, cfg, _ = load_checkpoint(uri)
    model.eval()
    size = 256 if quick else 1024
    syn = cfg.data.synthetic
    slide = generate_slide(
        size,
        size,
        TissueScales.from_patches(cfg.patches),
        777,
        GeneratorParams(
            syn.grade5_fraction, syn.texture_contrast, syn.noise_sigma, regime=syn.regime
        ),
    )
    default = dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, **_defaults()))
    before = dataclasses.replace(
        cfg, inference=dataclasses.replace(cfg.inference, overlap=0.0, blend="flat")
    )
    a = _measure(model, default, slide.image, slide.truth)
    b = _measure(model, before, slide.image, slide.truth)
    note = (
        f"{size}px slide, {uri}; default overlap {default.inference.overlap} "
        f"{default.inference.blend} (mIoU {a['miou']:.3f}) vs abutting flat (mIoU {b['miou']:.3f})"
    )
    return [
        Figure("seam_ratio", a["ratio"], "x", "lower", 1.2, b["ratio"], None, note),
        Figure(
            "seam_forward_px_per_output_px",
            a["fpo"],
            "px/px",
            "lower",
            None,
            b["fpo"],
            a["fpo"] / b["fpo"],
            note,
        ),
        Figure(
            "seam_inference_seconds",
            a["seconds"],
            "s",
            "lower",
            None,
            b["seconds"],
            a["seconds"] / b["seconds"],
            note,
        ),
    ]


def _defaults() -> dict:
    """The platform's default stitching (a checkpoint may carry older settings)."""
    from foveation.config import InferenceConfig

    d = InferenceConfig()
    return {"overlap": d.overlap, "blend": d.blend}
