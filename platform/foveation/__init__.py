"""The foveation platform: patch banks, foveated segmentation, training and inference.

The package order, lowest first, and what each layer holds: docs/architecture.md."""

__version__ = "0.1.0"
