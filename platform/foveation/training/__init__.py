"""Training: one step (``step.py``) and one loop (``loop.py``) for the single-device trainer and
the Ray Train worker (``worker.py``, started by ``trainer.fit``); ``distributed.py`` is the one
place that touches torch.distributed or DeepSpeed; ``recorder.py`` owns the metric names."""
