"""The training step's speed levers, applied to a model on its device before its engine is
built (``training.distributed``: the DeepSpeed engine and the single-device one alike), so the
model code stays single-device and lever-free.

- ``training.channels_last``: each segmenter's weights in channels-last memory, and its input
  converted on entry (``Segmenter.channels_last``), so convolutions run NHWC end to end. Under
  DeepSpeed ZeRO 1/2 the weights become views of its flat (NCHW-contiguous) buffers again; the
  inputs stay channels-last, which is what makes PyTorch pick NHWC convolutions, at the cost of
  laying out each (small) weight per call. The GPU ladder measures it as it runs under ZeRO 1.
- ``training.compile``: each segmenter's ``forward`` replaced by ``torch.compile`` of it with
  the named backend. The module itself is not wrapped, so its weights keep their names and
  checkpoints (state dicts) stay loadable by an eager model. The compiled forward is an
  instance attribute that refers to the module: a compiled model is not for ``deepcopy``,
  pickling or ``torch.save`` of the whole module (nothing here does those), and is freed by the
  garbage collector, not on its last reference. Evaluation batches of other sizes recompile
  (after torch's recompile limit it runs eagerly).
- ``training.cudnn_benchmark``: cuDNN's algorithm search on a CUDA device.
- ``training.adam``: the keyword for torch's Adam (``adam_options``, used by ``training.optim``).

F (the foveation net) is tiny and runs on 7x7 neighbourhoods; it is left as it is.
"""

from __future__ import annotations

import torch

from foveation.config import TrainingConfig

ADAM_OPTIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def adam_options(tc: TrainingConfig) -> dict:
    """Keyword arguments for ``torch.optim.Adam`` from ``training.adam``."""
    return dict(ADAM_OPTIONS[tc.adam])


def apply_speed_levers(model, tc: TrainingConfig, device) -> None:
    """Apply ``tc``'s levers to ``model`` (a ``FoveatedSegmenter`` already on ``device``), in
    place."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = tc.cudnn_benchmark
    for segmenter in model.segmenters():
        if tc.channels_last:
            segmenter.to(memory_format=torch.channels_last)
            segmenter.channels_last = True
        if tc.compile:
            segmenter.forward = torch.compile(segmenter.forward, backend=tc.compile)
