"""Data: the synthetic image set, image decoding, and (later issues) Gleason2019, STAPLE,
ingest and the Ray Data pipeline."""
