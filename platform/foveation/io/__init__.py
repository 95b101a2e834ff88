"""Slide and storage I/O: object storage and local disk behind one URI interface (``storage``),
ranged reads of remote files (``rangeio``), whole-slide readers (``slides``) and image codecs
(``images``). Nothing here knows about models or training."""
