"""Streaming segmentation metrics: one confusion matrix accumulated over images of any size.

Definitions (docs/method.md#metrics): IoU = TP / (TP + FP + FN), a class absent from both
prediction and label scores 0 (as the authors and the paper's "Overall" with Grade 5 at 0);
per-class accuracy = TP / label area; pixel accuracy = trace / all labelled pixels; Dice =
2 TP / (|pred| + |label|). Pixels labelled ``ignore_index`` count nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


@dataclass
class ConfusionMatrix:
    num_classes: int
    ignore_index: int = 255
    matrix: np.ndarray = field(init=False)  # [true, pred], int64

    def __post_init__(self) -> None:
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred, label) -> ConfusionMatrix:
        """Add one image (or tile): pred and label integer arrays of the same shape."""
        pred = np.asarray(pred).reshape(-1).astype(np.int64)
        label = np.asarray(label).reshape(-1).astype(np.int64)
        if pred.shape != label.shape:
            raise ValueError(f"pred and label differ in size: {pred.shape} vs {label.shape}")
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]
        k = self.num_classes
        if label.size and (label.max() >= k or label.min() < 0):
            raise ValueError(
                f"label holds class ids outside [0, {k}) (and not the ignore index {self.ignore_index})"
            )
        if pred.size and (pred.max() >= k or pred.min() < 0):
            raise ValueError(f"prediction holds class ids outside [0, {k})")
        self.matrix += np.bincount(label * k + pred, minlength=k * k).reshape(k, k)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        self.matrix += other.matrix
        return self

    @property
    def tp(self) -> np.ndarray:
        return np.diag(self.matrix)

    def iou(self) -> np.ndarray:
        union = self.matrix.sum(0) + self.matrix.sum(1) - self.tp
        return _ratio(self.tp, union)

    def dice(self) -> np.ndarray:
        return _ratio(2 * self.tp, self.matrix.sum(0) + self.matrix.sum(1))

    def class_accuracy(self) -> np.ndarray:
        return _ratio(self.tp, self.matrix.sum(1))

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(self.tp.sum() / total) if total else 0.0

    def summary(
        self, kept: tuple[int, ...] | None = None, names: tuple[str, ...] | None = None
    ) -> dict:
        """All metrics as plain floats: ``miou`` over all classes, ``miou_kept`` over ``kept``."""
        iou = self.iou()
        kept = tuple(range(self.num_classes)) if kept is None else kept
        names = names or tuple(str(i) for i in range(self.num_classes))
        return {
            "iou": {n: float(v) for n, v in zip(names, iou, strict=True)},
            "dice": {n: float(v) for n, v in zip(names, self.dice(), strict=True)},
            "class_accuracy": {
                n: float(v) for n, v in zip(names, self.class_accuracy(), strict=True)
            },
            "miou": float(iou.mean()),
            "miou_kept": float(iou[list(kept)].mean()),
            "pixel_accuracy": self.pixel_accuracy(),
            "absent_classes": [
                names[i] for i in range(self.num_classes) if self.matrix[i].sum() == 0
            ],
        }


def seam_ratio(mask: np.ndarray, row_edges, col_edges) -> dict[str, float]:
    """How often neighbouring pixels disagree in class across tile borders against inside
    tiles: ``across`` is the rate over neighbour pairs that straddle an edge (a pair (e - 1, e)
    for an edge e of ``row_edges`` vertically or ``col_edges`` horizontally), ``inside`` over
    all other neighbour pairs, ``ratio`` = across / inside (1: no seam)."""
    m = np.asarray(mask)
    dv = m[1:, :] != m[:-1, :]  # pair (r - 1, r) at index r - 1
    dh = m[:, 1:] != m[:, :-1]
    rv = np.zeros(m.shape[0] - 1, bool)
    rv[[e - 1 for e in row_edges if 0 < e < m.shape[0]]] = True
    ch = np.zeros(m.shape[1] - 1, bool)
    ch[[e - 1 for e in col_edges if 0 < e < m.shape[1]]] = True
    across_n = int(dv[rv].size + dh[:, ch].size)
    across = int(dv[rv].sum() + dh[:, ch].sum())
    inside_n = int(dv[~rv].size + dh[:, ~ch].size)
    inside = int(dv[~rv].sum() + dh[:, ~ch].sum())
    a, i = across / max(1, across_n), inside / max(1, inside_n)
    return {"across": a, "inside": i, "ratio": a / i if i else float("inf") if a else 1.0}


CUE_NAMES = ("context", "texture", "either")  # the synthetic generator's cue map values
"""What decides a synthetic slide's class at a pixel (its cue map's values 0, 1, 2): the
context around it, its fine texture, or either. Here, below training and evaluation, because
both read the APSM by cue (a training metric every epoch; a column of the evaluation report)."""


def apsm_cue_sums(
    apsm: np.ndarray, cue: np.ndarray, xr_scale: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sums and counts of an APSM [h, w] over the x_r cells whose centre the cue map marks as
    each of ``CUE_NAMES``."""
    h, w = apsm.shape
    rows = np.minimum((np.arange(h) + 0.5) * xr_scale, cue.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(w) + 0.5) * xr_scale, cue.shape[1] - 1).astype(int)
    at = cue[rows[:, None], cols[None, :]]
    sums = np.array([apsm[at == c].sum() for c in range(len(CUE_NAMES))], np.float64)
    counts = np.array([(at == c).sum() for c in range(len(CUE_NAMES))], np.float64)
    return sums, counts


def apsm_cue_means(sums: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """Mean APSM (px) by cue name from ``apsm_cue_sums``' sums and counts (added over slides,
    or of one); a cue with no cell is left out."""
    return {n: float(sums[i] / counts[i]) for i, n in enumerate(CUE_NAMES) if counts[i]}
