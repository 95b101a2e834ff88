"""Training: the single-device step and loop (this issue); ``distributed.py`` (the Ray Train /
DeepSpeed issue) is the one place that will touch torch.distributed or DeepSpeed."""
