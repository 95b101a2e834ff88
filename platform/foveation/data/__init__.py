"""Data: the synthetic and toy image sets, the Gleason2019 layout, STAPLE fusion, ingest into
pyramids and a manifest, the one extractor of training batches, and the Ray Data pipeline."""
