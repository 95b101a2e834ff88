"""The foveation platform: patch banks, foveated segmentation, training and inference.

Modules moved into folders by concern keep answering to their old names (``foveation.slides``
is ``foveation.io.slides``), so code written against earlier releases keeps importing; see
``foveation._moved``."""

__version__ = "0.1.0"

from foveation import _moved

_moved.install()
