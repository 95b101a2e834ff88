"""The three deployments of the app (composed in ``serve.app.build_app``):

- ``ModelServer`` (autoscaled): loads the checkpoint in its constructor and segments uploaded
  images with the tiled whole-image inference; the tiles' segmenter forwards of concurrent requests
  are batched with ``@serve.batch``.
- ``SlideJobRunner`` (one replica): whole-slide jobs, out of core, state in the job store; on
  start it resumes the jobs a previous replica left unfinished. Each job's slide runs as a Ray
  task (``predict_slide_task``) wherever the cluster has room, ``jobs.max_concurrent`` at
  once, so the work scales past this one replica; ``jobs.run_as = "runner"`` keeps it in
  the replica.
- ``Ingress`` (FastAPI, in ``serve.app``): HTTP, auth, limits, JSON errors.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
import torch
from ray import serve

from foveation import monitoring
from foveation.serving.errors import RequestError
from foveation.serving.settings import ServeConfig, device_here, serve_config_from_dict

log = logging.getLogger("ray.serve")


def _load(checkpoint: str, settings: ServeConfig, threads: int | None):
    from foveation.checkpoint import load_checkpoint

    if threads:
        torch.set_num_threads(threads)
    model, cfg, meta = load_checkpoint(checkpoint, device_here(settings))
    return model, cfg, meta


INLINE_MAX_PIXELS = 1 << 22
"""Largest image segmented in the replica's event loop rather than a worker thread."""


def _batch_locations(items: list) -> int:
    return sum(int(bank.shape[0]) for bank, _ in items)


@serve.deployment
class ModelServer:
    def __init__(self, checkpoint: str, settings: dict[str, Any]) -> None:
        self.settings = serve_config_from_dict(settings)
        self.checkpoint = checkpoint
        self.device = device_here(self.settings)
        if self.device == "cpu" and ray.get_gpu_ids():
            log.warning(
                "serve.device %r: this replica holds GPU %s, but no CUDA device is usable "
                "here; serving on CPU",
                self.settings.device,
                ray.get_gpu_ids(),
            )
        self.model, self.cfg, self.meta = _load(
            checkpoint, self.settings, self.settings.model.torch_threads
        )
        b = self.settings.batching
        # A request's chunk of tiles (inference.batch_size locations) must fit one batch.
        self.forward_batched.set_max_batch_size(
            max(b.max_batch_locations, self.cfg.inference.batch_size)
        )
        self.forward_batched.set_batch_wait_timeout_s(b.wait_timeout_s)
        self._requests = ThreadPoolExecutor(
            self.settings.model.max_ongoing_requests, thread_name_prefix="segment"
        )
        self._forwards = ThreadPoolExecutor(1, thread_name_prefix="forward")
        log.info("model %s loaded (%s)", checkpoint, self.cfg.model.backbone)

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "class_names": list(self.cfg.evaluation.class_names),
            "xr_scale": self.cfg.patches.xr_scale,
            "fovs": list(self.cfg.patches.fovs),
            "backbone": self.cfg.model.backbone,
            "device": self.device,
            "batching": self.settings.batching.enabled,
            "meta": {k: self.meta.get(k) for k in ("step", "epoch") if k in self.meta},
        }

    async def segment(self, image, want_apsm: bool = False) -> dict[str, Any]:
        from foveation.serving.runtime import segment_image

        t_call = time.perf_counter()
        loop = asyncio.get_running_loop()
        forward = None
        if self.settings.batching.enabled:

            def forward(bank: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                fut = asyncio.run_coroutine_threadsafe(self.forward_batched((bank, w)), loop)
                return fut.result()

        def run():
            t = time.perf_counter()
            out = segment_image(self.model, self.cfg, image, forward, self.device)
            return out, time.perf_counter() - t

        if forward is None and image.shape[0] * image.shape[1] <= INLINE_MAX_PIXELS:
            # Batching off, a small image: in this event loop, one request at a time. A worker
            # thread cost about 13 ms per request on 2 cores (the GIL handed back and forth
            # with the loop), and the work is CPU-bound. Big images go to a thread so that the
            # loop (health checks in Serve's throughput-optimised mode) is never held long.
            res, inference_s = run()
        else:
            res, inference_s = await loop.run_in_executor(self._requests, run)
        return {
            "timing": {"inference": inference_s, "model": time.perf_counter() - t_call},
            "mask": res.mask,
            "counts": res.counts,
            "apsm": res.apsm if want_apsm else None,
            "xr_scale": self.cfg.patches.xr_scale,
            "class_names": list(self.cfg.evaluation.class_names),
        }

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=_batch_locations)
    async def forward_batched(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
        from foveation.serving.runtime import forward_tiles

        sizes = [int(bank.shape[0]) for bank, _ in items]
        bank = torch.cat([b for b, _ in items]) if len(items) > 1 else items[0][0]
        w = torch.cat([w for _, w in items]) if len(items) > 1 else items[0][1]
        loop = asyncio.get_running_loop()
        logits = await loop.run_in_executor(self._forwards, forward_tiles, self.model, bank, w)
        monitoring.record("foveation_serve_tile_batch_locations", float(sum(sizes)))
        monitoring.record("foveation_serve_tile_batch_requests", float(len(items)))
        return list(torch.split(logits, sizes))


PROGRESS_FILE = "progress.json"
"""A running slide task's rows done and total, under its job's prefix (read by the runner)."""

_TASK_MODELS: dict[tuple[str, str], tuple] = {}
"""Models loaded by slide tasks, per worker process (Ray reuses a task's worker)."""


@ray.remote(max_retries=0)
def predict_slide_task(
    checkpoint: str, settings: dict[str, Any], slide_uri: str, prefix: str, kwargs: dict
) -> tuple[dict, dict]:
    """One job's slide, segmented wherever Ray placed this task: ``outputs.predict_slide``
    with the checkpoint's model; progress goes to ``<prefix>/progress.json`` (throttled)
    for the runner to read, since the task cannot call back into it."""
    import json

    from foveation.inference.outputs import predict_slide
    from foveation.io import storage

    cfg_s = serve_config_from_dict(settings)
    key = (checkpoint, device_here(cfg_s))
    if key not in _TASK_MODELS:
        threads = max(1, int(cfg_s.jobs.task_cpus))
        _TASK_MODELS.clear()
        _TASK_MODELS[key] = _load(checkpoint, cfg_s, threads)
    model, cfg, _ = _TASK_MODELS[key]
    target, last = storage.join(prefix, PROGRESS_FILE), [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= cfg_s.jobs.progress_interval_s or done == total:
            last[0] = now
            storage.write_bytes(target, json.dumps({"done": done, "total": total}).encode())

    results, summary = predict_slide(
        model, cfg, slide_uri, prefix, device=key[1], progress=progress, **kwargs
    )
    summary["worker"] = {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}
    return results, summary


class TaskPredictor:
    """A ``runtime.SlidePredictor`` that runs each slide as a Ray task (``serve.jobs``
    ``task_cpus``, ``task_gpus``) and waits on it from the runner's job thread: progress is
    read back from the store, a cancelled job cancels its task, a task's error is raised as
    its cause."""

    def __init__(self, checkpoint: str, settings: dict[str, Any], parsed: ServeConfig) -> None:
        self.checkpoint, self.settings, self.jobs = checkpoint, settings, parsed.jobs

    def __call__(self, slide_uri: str, prefix: str, progress=None, cancelled=None, **kwargs):
        import json

        from ray.exceptions import RayTaskError, TaskCancelledError

        from foveation.inference.outputs import JobCancelled
        from foveation.io import storage

        task = predict_slide_task.options(
            num_cpus=self.jobs.task_cpus, num_gpus=self.jobs.task_gpus or None
        )
        ref = task.remote(self.checkpoint, self.settings, slide_uri, prefix, kwargs)
        source = storage.join(prefix, PROGRESS_FILE)
        try:
            while True:
                ready, _ = ray.wait([ref], timeout=max(0.2, self.jobs.progress_interval_s))
                if ready:
                    return ray.get(ref)
                if cancelled is not None and cancelled():
                    ray.cancel(ref, force=True)
                    raise JobCancelled()
                if progress is not None and storage.exists(source):
                    p = json.loads(storage.read_bytes(source))
                    progress(int(p["done"]), int(p["total"]))
        except TaskCancelledError:
            raise JobCancelled() from None
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise
        finally:
            try:
                storage.delete(source, missing_ok=True)
            except storage.StorageError as exc:  # never hide the job's own outcome
                log.warning("%s: not deleted (%s)", source, exc)


@serve.deployment(num_replicas=1)
class SlideJobRunner:
    def __init__(self, checkpoint: str, settings: dict[str, Any]) -> None:
        from foveation.serving.runtime import JobRunner

        self.settings = serve_config_from_dict(settings)
        if self.settings.jobs.run_as == "tasks":
            # The tasks load the model where they run; this replica only coordinates (and
            # may have no GPU where serve.device is "cuda").
            model, cfg, predictor = None, None, TaskPredictor(checkpoint, settings, self.settings)
        else:
            model, cfg, _ = _load(checkpoint, self.settings, self.settings.runner.torch_threads)
            predictor = None
        self.runner = JobRunner(
            model, cfg, self.settings, checkpoint, _record_job, predictor=predictor
        )
        resumed = self.runner.resume()
        if resumed:
            log.info("resumed %d unfinished job(s)", len(resumed))

    def submit(self, slide_uri: str) -> dict[str, Any]:
        return _as_result(lambda: self.runner.submit(slide_uri).to_dict())

    def cancel(self, job_id: str) -> dict[str, Any]:
        return _as_result(lambda: self.runner.cancel(job_id).to_dict())

    def pid(self) -> int:
        return os.getpid()


def _record_job(rec, running: int, queued: int) -> None:
    monitoring.record("foveation_serve_jobs_running", float(running))
    monitoring.record("foveation_serve_jobs_queued", float(queued))
    progress = 1.0 if rec.final else rec.progress
    # An ended job's series goes after an hour: job ids are unbounded.
    ttl = 3600.0 if rec.final else monitoring.GAUGE_TTL_S
    monitoring.record("foveation_serve_job_progress_ratio", progress, ttl_s=ttl, job=rec.id)
    if rec.final:
        monitoring.record("foveation_serve_jobs_total", state=rec.state)


def _as_result(fn) -> dict[str, Any]:
    """Errors cross the handle as data (a RequestError's status and message), not pickles."""
    try:
        return {"ok": fn()}
    except RequestError as exc:
        return {"error": exc.to_dict()["error"]}


__all__ = ["ModelServer", "SlideJobRunner"]
