"""The slide formats the platform reads, in one table (suffix -> reader backend, whole slide or
not, TIFF or not) that every part that meets a slide file reads instead of a suffix list of
its own: the reader (``io.slides.SlideReader`` picks pyvips or OpenSlide), ingest
(``data.ingest``: a slide streamed tile by tile by ``data.wsi``, or decoded whole as a core)
and prediction (``prediction.list_slides``: the files of a folder that are slides). Lists kept
apart had drifted (one read Sakura's ``.svslide`` but ingest decoded it as a core, prediction
skipped Hamamatsu's ``.vms`` / ``.vmu``): a format added here is read, ingested and predicted.

Every format OpenSlide reads is read by OpenSlide (vendor pyramids, their metadata and mpp);
TIFF, JPEG and PNG by pyvips, which also reads them from S3 by ranged GETs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

OPENSLIDE, PYVIPS = "openslide", "pyvips"


@dataclass(frozen=True)
class SlideFormat:
    """One file format of slides, by its suffix."""

    suffix: str
    """Lower case, with the dot: ".svs"."""
    backend: str
    """``OPENSLIDE`` (vendor formats; OpenSlide reads only local files, so an S3 slide is first
    copied to a local cache) or ``PYVIPS`` (ranged reads, local or S3)."""
    whole_slide: bool
    """Ingest streams it tile by tile into the store (a pyramid of any size, never decoded
    whole); False: a plain image ingest decodes whole, as a Gleason2019 core."""
    tiff: bool
    """Stored as a TIFF, so its IFD chain can be checked against the file's length before it
    is opened (a copy cut short: ``io.slides.check_tiff_complete``)."""
    what: str
    """The format in words, for messages and docs."""


FORMATS: dict[str, SlideFormat] = {
    f.suffix: f
    for f in (
        SlideFormat(".svs", OPENSLIDE, True, True, "Aperio SVS"),
        SlideFormat(".ndpi", OPENSLIDE, True, True, "Hamamatsu NDPI"),
        SlideFormat(".vms", OPENSLIDE, True, False, "Hamamatsu VMS (an index of JPEG files)"),
        SlideFormat(".vmu", OPENSLIDE, True, False, "Hamamatsu VMU"),
        SlideFormat(".mrxs", OPENSLIDE, True, False, "3DHISTECH MIRAX (with its data folder)"),
        SlideFormat(".scn", OPENSLIDE, True, True, "Leica SCN"),
        SlideFormat(".bif", OPENSLIDE, True, True, "Ventana BIF"),
        SlideFormat(".svslide", OPENSLIDE, True, False, "Sakura SVSlide (an SQLite file)"),
        SlideFormat(".tif", PYVIPS, True, True, "TIFF: pyramidal, OME-TIFF or plain"),
        SlideFormat(".tiff", PYVIPS, True, True, "TIFF: pyramidal, OME-TIFF or plain"),
        SlideFormat(".jpg", PYVIPS, False, False, "JPEG"),
        SlideFormat(".jpeg", PYVIPS, False, False, "JPEG"),
        SlideFormat(".png", PYVIPS, False, False, "PNG"),
    )
}
"""Every slide format, by suffix. A file without a suffix is read by pyvips (it sniffs the
format), as the store's objects may be named without one."""

SLIDE_SUFFIXES: tuple[str, ...] = tuple(FORMATS)
"""Every suffix of ``FORMATS``: the files of a folder that are slides."""


def suffix_of(uri: str) -> str:
    """The lower-case suffix of a path or URI, a query string left out: "s3://b/A.SVS?v=1" ->
    ".svs"; "" when it has none."""
    return os.path.splitext(uri.lower().split("?")[0])[1]


def slide_format(uri: str) -> SlideFormat | None:
    """The format of ``uri`` by its suffix, or None for a suffix the platform does not read."""
    return FORMATS.get(suffix_of(uri))


def is_whole_slide(uri: str) -> bool:
    """Whether ingest streams ``uri`` tile by tile (``SlideFormat.whole_slide``)."""
    fmt = slide_format(uri)
    return fmt is not None and fmt.whole_slide
