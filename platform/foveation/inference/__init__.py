"""Whole-image inference: region sources in, tiles out to sinks
(docs/contracts.md#inference-source-and-sink)."""

from foveation.inference.sinks import ArraySink, Sink
from foveation.inference.sources import ArraySource, RegionSource
from foveation.inference.wholeslide import forward_pixels, segment

__all__ = ["ArraySink", "ArraySource", "RegionSource", "Sink", "forward_pixels", "segment"]
