"""Sinks receive whole-image inference outputs row block by row block, so a slide bigger than
memory never needs a full-size array. ``ArraySink`` keeps everything in memory (small images,
tests); ``evaluation.slides.ScoringSink`` scores rows against a label pyramid and
``inference.outputs.JobSink`` writes a slide job's OME-TIFF / GeoJSON results
(docs/contracts.md#inference-source-and-sink)."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class Sink(Protocol):
    def begin(self, height: int, width: int, num_classes: int) -> None:
        """Called once before anything else. A sink that restored a previous attempt's rows
        sets ``resume_row`` here (an optional attribute; 0 when absent): ``segment`` then
        writes rows from it on and computes only the bands those rows need."""
        ...

    def write_weights(self, weights: torch.Tensor, apsm: torch.Tensor) -> None:
        """F's weights [D, h, w] and the APSM [h, w] on the x_r grid, once per image."""
        ...

    def write_rows(self, top: int, probs: torch.Tensor) -> None:
        """Final class probabilities [K, n, W] of image rows ``top .. top + n``, in order."""
        ...

    def close(self) -> None: ...


class ArraySink:
    """Collects the label mask [H, W] (uint8), optionally the probabilities [K, H, W] (float16),
    and F's weights and APSM."""

    def __init__(self, keep_probs: bool = False) -> None:
        self.keep_probs = keep_probs
        self.mask: np.ndarray | None = None
        self.probs: np.ndarray | None = None
        self.weights: np.ndarray | None = None
        self.apsm: np.ndarray | None = None
        self.rows_written = 0

    def begin(self, height: int, width: int, num_classes: int) -> None:
        self.mask = np.zeros((height, width), dtype=np.uint8)
        if self.keep_probs:
            self.probs = np.zeros((num_classes, height, width), dtype=np.float16)

    def write_weights(self, weights: torch.Tensor, apsm: torch.Tensor) -> None:
        self.weights = weights.cpu().numpy()
        self.apsm = apsm.cpu().numpy()

    def write_rows(self, top: int, probs: torch.Tensor) -> None:
        if top != self.rows_written:
            raise RuntimeError(f"rows out of order: got {top}, expected {self.rows_written}")
        n = probs.shape[1]
        self.mask[top : top + n] = probs.argmax(0).to(torch.uint8).cpu().numpy()
        if self.probs is not None:
            self.probs[:, top : top + n] = probs.cpu().numpy()
        self.rows_written += n

    def close(self) -> None:
        if self.mask is not None and self.rows_written != self.mask.shape[0]:
            raise RuntimeError(
                f"sink closed after {self.rows_written} of {self.mask.shape[0]} rows"
            )
