"""Single-device model code: the foveation net, the mixers, the segmenter, and the foveated
segmenter that ties them. Nothing here imports Ray or DeepSpeed (distribution lives in
``foveation.training.distributed``)."""

from foveation.models.foveated import FoveatedSegmenter, build_model
from foveation.models.fovnet import FoveationNet
from foveation.models.mixing import MIXERS, Mixer
from foveation.models.segmenter import BACKBONES, Segmenter

__all__ = [
    "BACKBONES",
    "MIXERS",
    "FoveatedSegmenter",
    "FoveationNet",
    "Mixer",
    "Segmenter",
    "build_model",
]
