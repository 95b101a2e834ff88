"""Evaluation: inference over in-memory images (``inmemory``) and over whole slides through the
inference path (``slides``), and the report (``report``). The confusion-matrix metrics live on
the ground floor (``foveation.metrics``); the paper's experiment in ``foveation.experiments``."""
