"""The ``serve`` suite: the Serve app on loopback (real HTTP, an httpx load loop) against the
in-process forward of the same model on the same image, in one run.

- Batching off, concurrency 1: p50 / p99 latency and throughput of ``POST /v1/segment`` (PNG
  in, PNG mask out) vs ``runtime.segment_image`` on the decoded image in this process, with
  the same torch threads as the model replica (1), the two interleaved request by request.
  The overhead figure is the p50 difference (target: at most 10 ms); the Server-Timing
  header splits it (inference, model replica, handle round trip, ingress). The load
  generator shares the machine's cores with Ray. ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` in the
  environment (read when Ray starts) measures Serve's throughput-optimised mode.
- Batching on (``@serve.batch`` of tile forwards): throughput at concurrency 8 vs 1, and at
  concurrency 8 vs batching off at concurrency 8. One model replica throughout, so the figures
  measure batching, not autoscaling.

Every ratio is the median of interleaved repetitions (``docs/contracts.md#benchmarks``): a
round deploys the app with batching off (the concurrency-1 block against the in-process
forward, then concurrency 8), then redeploys it with batching on (concurrency 1, then 8); each
deployment is warmed up before it is timed. Figures without a baseline (latencies of one mode,
the Server-Timing parts) come from the round whose served-vs-in-process p50 ratio is the
median.
"""

from __future__ import annotations

import dataclasses
import io
import os
import socket
import tempfile
import threading
import time

import numpy as np

from benchmarks import Figure, interleaved, median_compared
from foveation.config import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image(size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    low = rng.uniform(0, 255, (size // 32 + 2, size // 32 + 2, 3))
    img = np.kron(low, np.ones((32, 32, 1)))[:size, :size]
    return (img * 0.8 + rng.uniform(0, 40, (size, size, 3))).astype(np.uint8)


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def _server_timing(r) -> dict[str, float]:
    """Seconds per part of a response's Server-Timing header."""
    out = {}
    for part in r.headers.get("server-timing", "").split(", "):
        if ";dur=" in part:
            k, v = part.split(";dur=")
            out[k] = float(v) / 1000
    return out


def _load(url: str, body: bytes, concurrency: int, requests: int) -> tuple[list[float], float]:
    """Latencies (s) of ``requests`` POSTs sent by ``concurrency`` closed-loop clients, and
    the wall time of the whole run."""
    import httpx

    lat: list[float] = []
    lock = threading.Lock()
    left = [requests]

    def client() -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                t = time.perf_counter()
                r = c.post("/v1/segment", content=body, headers={"Content-Type": "image/png"})
                dt = time.perf_counter() - t
                if r.status_code != 200:
                    raise RuntimeError(f"benchmark request failed: {r.status_code} {r.text[:200]}")
                with lock:
                    lat.append(dt)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, time.perf_counter() - t0


def _deploy(ckpt: str, port: int, store: str, batching: bool, name: str) -> str:
    from ray import serve

    from serve.app import AppArgs, build_app

    settings = {
        "jobs": {"store": store, "allowed_prefixes": [store]},
        "batching": {"enabled": batching, "max_batch_locations": 256, "wait_timeout_s": 0.005},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "model": {"num_cpus": 1.0, "max_ongoing_requests": 16, "max_queued_requests": 64},
        "runner": {"num_cpus": 0.25},
        "ingress": {"num_cpus": 0.25, "max_ongoing_requests": 64, "max_queued_requests": 128},
    }
    app = build_app(AppArgs(checkpoint=ckpt, settings=settings))
    serve.run(app, name=name, route_prefix="/")
    return f"http://127.0.0.1:{port}"


_PART_NOTES = {
    "inference": "Server-Timing: segment_image inside the model replica",
    "model": "Server-Timing: the model replica's method, entry to return",
    "handle": "Server-Timing: the ingress's call of the model deployment (handle round trip)",
    "ingress": "Server-Timing: the ingress's whole request (decode, call, PNG encode)",
}


def _off_round(url, body, img, model, mcfg, n1: int, n8: int) -> dict:
    """Batching off: concurrency 1 interleaved request by request with the in-process forward
    (the replica's thread count, 1, so both see the same background load), then concurrency 8."""
    import httpx
    import torch

    from foveation.serving.runtime import segment_image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    local: list[float] = []
    off1: list[float] = []
    timing: dict[str, list[float]] = {}
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            for i in range(n1 + 5):
                t = time.perf_counter()
                segment_image(model, mcfg, img)
                dt_local = time.perf_counter() - t
                t = time.perf_counter()
                r = client.post("/v1/segment", content=body, headers={"Content-Type": "image/png"})
                dt = time.perf_counter() - t
                if r.status_code != 200:
                    raise RuntimeError(f"benchmark request failed: {r.status_code} {r.text[:200]}")
                if i >= 5:  # warm-up
                    local.append(dt_local)
                    off1.append(dt)
                    for k, v in _server_timing(r).items():
                        timing.setdefault(k, []).append(v)
    finally:
        torch.set_num_threads(threads)
    _load(url, body, 8, 8)  # warm-up
    off8, wall = _load(url, body, 8, n8)
    return {
        "local": local,
        "off1": off1,
        "parts": {k: _pct(v, 50) for k, v in timing.items()},
        "local_rps": 1 / float(np.mean(local)),
        "off1_rps": 1 / float(np.mean(off1)),
        "off8": off8,
        "off8_rps": n8 / wall,
    }


def _on_round(url, body, n1: int, n8: int) -> dict:
    """Batching on: concurrency 1, then concurrency 8."""
    _load(url, body, 8, 16)  # warm-up
    on1, wall = _load(url, body, 1, n1)
    on1_rps = n1 / wall
    on8, wall = _load(url, body, 8, n8)
    return {"on1": on1, "on1_rps": on1_rps, "on8": on8, "on8_rps": n8 / wall}


def run(config: str = "jobs/configs/bench.toml", quick: bool = False) -> list[Figure]:
    import torch
    from ray import serve

    from foveation.checkpoint import load_checkpoint, save_checkpoint
    from foveation.models.foveated import build_model
    from foveation.raycluster import init_ray

    cfg = load_config(config)
    n1, n8 = (10, 16) if quick else (40, 64)
    size = 128 if quick else 256
    img = _image(size)
    body = _png(img)
    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    ckpt = f"{tmp}/model"
    torch.manual_seed(0)
    save_checkpoint(ckpt, build_model(cfg), dataclasses.replace(cfg, name="bench-serve"))

    model, mcfg, _ = load_checkpoint(ckpt)
    init_ray()
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def off() -> dict:
        url = _deploy(ckpt, port, f"{tmp}/jobs", batching=False, name="bench")
        return _off_round(url, body, img, model, mcfg, n1, n8)

    def on() -> dict:
        url = _deploy(ckpt, port, f"{tmp}/jobs", batching=True, name="bench")
        return _on_round(url, body, n1, n8)

    try:
        rounds = interleaved({"off": off, "on": on})
    finally:
        serve.shutdown()
    offs, ons = rounds["off"], rounds["on"]

    ms = 1000.0
    mode = "throughput-optimised" if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") else "default"
    note = (
        f"{size}x{size} PNG, {cfg.name} model ({cfg.model.backbone}), 1 replica, 1 thread, "
        f"Serve {mode} mode, {n1} requests at concurrency 1 and {n8} at 8 per round"
    )
    p50 = median_compared(
        "serve_p50_latency_c1_batching_off",
        [_pct(r["off1"], 50) * ms for r in offs],
        [_pct(r["local"], 50) * ms for r in offs],
        "ms",
        "lower",
        None,
        note + "; baseline: in-process segment_image",
    )
    i = [_pct(r["off1"], 50) * ms for r in offs].index(p50.value)
    mid, on_mid = offs[i], ons[i]  # the median round, for the figures without a baseline
    return [
        p50,
        median_compared(
            "serve_p99_latency_c1_batching_off",
            [_pct(r["off1"], 99) * ms for r in offs],
            [_pct(r["local"], 99) * ms for r in offs],
            "ms",
            "lower",
            None,
        ),
        Figure(
            "serve_overhead_p50_c1_batching_off",
            p50.value - p50.baseline_value,
            "ms",
            "lower",
            10.0,
            note="served p50 minus in-process p50 (HTTP, PNG codec, proxy, ingress, handle), "
            "the median round's",
        ),
        *[
            Figure(
                f"serve_p50_{k}_c1_batching_off",
                v * ms,
                "ms",
                "lower",
                note=_PART_NOTES.get(k, ""),
            )
            for k, v in mid["parts"].items()
        ],
        median_compared(
            "serve_throughput_c1_batching_off",
            [r["off1_rps"] for r in offs],
            [r["local_rps"] for r in offs],
            "req/s",
            "higher",
            None,
        ),
        Figure("serve_throughput_c8_batching_off", mid["off8_rps"], "req/s", "higher"),
        Figure("serve_p50_latency_c1_batching_on", _pct(on_mid["on1"], 50) * ms, "ms", "lower"),
        Figure("serve_p99_latency_c8_batching_off", _pct(mid["off8"], 99) * ms, "ms", "lower"),
        Figure("serve_p99_latency_c8_batching_on", _pct(on_mid["on8"], 99) * ms, "ms", "lower"),
        median_compared(
            "serve_throughput_batching_on_c8_vs_c1",
            [r["on8_rps"] for r in ons],
            [r["on1_rps"] for r in ons],
            "req/s",
            "higher",
            None,
            "batching on: concurrency 8 over concurrency 1",
        ),
        median_compared(
            "serve_throughput_c8_batching_on_vs_off",
            [r["on8_rps"] for r in ons],
            [r["off8_rps"] for r in offs],
            "req/s",
            "higher",
            None,
            "concurrency 8: batching on over batching off",
        ),
    ]
