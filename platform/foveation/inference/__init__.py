"""Whole-image inference: region sources in, tiles out to sinks
(docs/contracts.md#inference-source-and-sink), and what a whole-slide prediction writes
(``outputs``: OME-TIFF, heat maps, APSM; ``geojson``: QuPath polygons), which the Serve app's
slide jobs and batch prediction share."""

from foveation.inference.sinks import ArraySink, Sink
from foveation.inference.sources import ArraySource, RegionSource
from foveation.inference.wholeslide import forward_pixels, segment

__all__ = ["ArraySink", "ArraySource", "RegionSource", "Sink", "forward_pixels", "segment"]
