"""Evaluation of a model on in-memory images: whole-image inference on each, one streaming
confusion matrix over all of them, and the per-image outputs the report draws."""

from __future__ import annotations

import torch

from foveation.config import Config
from foveation.data.samples import Sample
from foveation.inference import ArraySink, ArraySource, segment
from foveation.metrics import ConfusionMatrix
from foveation.models.foveated import FoveatedSegmenter


def evaluate(
    model: FoveatedSegmenter,
    samples: list[Sample],
    cfg: Config,
    mode: str | None = None,
    device: torch.device | str = "cpu",
    keep_outputs: int = 0,
) -> dict:
    """Metrics summary (``ConfusionMatrix.summary``) plus ``outputs``: mask, APSM and mean
    weights of the first ``keep_outputs`` images."""
    ev = cfg.evaluation
    cm = ConfusionMatrix(cfg.model.num_classes, ev.ignore_index)
    outputs = []
    weight_sum, n = None, 0
    for i, s in enumerate(samples):
        sink = ArraySink()
        segment(model, ArraySource(s.image, s.slide_id), cfg, sink, mode=mode, device=device)
        cm.update(sink.mask, s.label)
        wmean = sink.weights.reshape(sink.weights.shape[0], -1).mean(1)
        weight_sum = wmean if weight_sum is None else weight_sum + wmean
        n += 1
        if i < keep_outputs:
            outputs.append(
                {
                    "slide_id": s.slide_id,
                    "mask": sink.mask,
                    "apsm": sink.apsm,
                    "label": s.label,
                    "image": s.image,
                }
            )
    out = cm.summary(ev.kept_classes, ev.class_names)
    out["confusion_matrix"] = cm.matrix.tolist()
    out["weight_mean"] = (weight_sum / max(n, 1)).tolist() if weight_sum is not None else []
    out["outputs"] = outputs
    return out
