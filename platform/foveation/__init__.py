"""The foveation platform: patch banks, foveated segmentation, training and inference."""

__version__ = "0.1.0"
