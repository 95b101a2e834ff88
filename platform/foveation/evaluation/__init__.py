"""Evaluation: streaming confusion-matrix metrics (``metrics``), evaluation of in-memory images
(``inmemory``) and of whole slides through the inference path (``slides``), the report
(``report``) and the paper's experiment with every mode on one budget (``reproduce``).

``from foveation.evaluation import evaluate`` keeps working; it is imported on first use, so
importing ``foveation.evaluation.metrics`` does not pull in the models."""

from __future__ import annotations


def __getattr__(name: str):
    if name == "evaluate":
        from foveation.evaluation.inmemory import evaluate

        return evaluate
    raise AttributeError(f"module 'foveation.evaluation' has no attribute {name!r}")
