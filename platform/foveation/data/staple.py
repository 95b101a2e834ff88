"""Fusing annotators into one gold standard with SimpleITK's multi-label STAPLE (as the paper
did for Gleason2019), and the "average expert" baseline: each annotator scored against the
fused map, per-class IoU averaged over annotators (the paper's last row of Table 1)."""

from __future__ import annotations

import numpy as np

from foveation.metrics import ConfusionMatrix

UNDECIDED = 254


def majority_vote(maps: list[np.ndarray], num_classes: int) -> np.ndarray:
    counts = np.zeros((num_classes, *maps[0].shape), np.int32)
    for m in maps:
        for c in range(num_classes):
            counts[c] += m == c
    return counts.argmax(0).astype(np.uint8)


def staple(maps: list[np.ndarray], num_classes: int) -> np.ndarray:
    """The STAPLE consensus of label maps (uint8 class ids, same shape); pixels STAPLE leaves
    undecided take the majority vote. One map is returned as it is."""
    import SimpleITK as sitk

    if not maps:
        raise ValueError("staple: no annotator maps")
    shape = maps[0].shape
    for i, m in enumerate(maps):
        if m.shape != shape:
            raise ValueError(f"staple: map {i} has shape {m.shape}, expected {shape}")
    if all(np.array_equal(m, maps[0]) for m in maps[1:]):  # one map, or all agree
        return maps[0].copy()
    f = sitk.MultiLabelSTAPLEImageFilter()
    f.SetLabelForUndecidedPixels(UNDECIDED)
    fused = sitk.GetArrayFromImage(
        f.Execute([sitk.GetImageFromArray(np.ascontiguousarray(m)) for m in maps])
    )
    fused = fused.astype(np.uint8)
    undecided = fused == UNDECIDED
    if undecided.any():
        fused[undecided] = majority_vote(maps, num_classes)[undecided]
    return fused


def annotator_confusions(
    maps: list[np.ndarray], fused: np.ndarray, num_classes: int
) -> list[ConfusionMatrix]:
    """One confusion matrix per annotator against the fused map (accumulate over slides by
    annotator with ``ConfusionMatrix.merge``)."""
    return [ConfusionMatrix(num_classes).update(m, fused) for m in maps]


def average_expert(
    per_annotator: dict[int, ConfusionMatrix], kept: tuple[int, ...], names: tuple[str, ...]
) -> dict:
    """Per-class IoU averaged over annotators, and the means, as a ``ConfusionMatrix.summary``-like dict."""
    ious = np.array([cm.iou() for cm in per_annotator.values()])
    iou = ious.mean(0)
    acc = np.array([cm.pixel_accuracy() for cm in per_annotator.values()]).mean()
    return {
        "iou": {n: float(v) for n, v in zip(names, iou, strict=True)},
        "miou": float(iou.mean()),
        "miou_kept": float(iou[list(kept)].mean()),
        "pixel_accuracy": float(acc),
        "annotators": sorted(per_annotator),
    }
