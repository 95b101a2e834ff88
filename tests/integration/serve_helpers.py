"""Helpers of the Serve integration tests: a checkpoint of a randomly initialised tiny model,
test images and slides, crafted bad inputs, and starting the app on a free port."""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import threading
import time
import zlib

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(proc, timeout: float) -> str:
    """The output of a driver process (``MultiNode.python``), which must exit 0 in time."""
    import subprocess

    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(
            f"the driver did not finish in {timeout} s:\n{output[-5000:]}"
        ) from None
    assert proc.returncode == 0, output[-5000:]
    return output


def deploy_across(cluster, checkpoint: str, settings: dict, app: str, port: int) -> None:
    """The Serve app deployed on a multi-node ``cluster`` (``MultiNode``) by a driver that then
    exits, as ``serve deploy`` does: the HTTP proxy on the head only (every node shares
    127.0.0.1 here), on ``port``."""
    code = (
        "import ray\n"
        "from ray import serve\n"
        "from serve.app import AppArgs, build_app\n"
        "ray.init()\n"
        f"serve.start(proxy_location='HeadOnly', http_options={{'host': '127.0.0.1', "
        f"'port': {port}}})\n"
        f"app = build_app(AppArgs(checkpoint={checkpoint!r}, settings={settings!r}))\n"
        f"serve.run(app, name={app!r}, route_prefix='/')\n"
        "print('deployed')\n"
    )
    output = finish(cluster.python("-c", code), timeout=300)
    assert "deployed" in output, output[-3000:]


def write_checkpoint(uri: str, root) -> str:
    import torch

    from foveation.checkpoint import save_checkpoint
    from foveation.config import load_config
    from foveation.models.foveated import build_model

    cfg = load_config(root / "jobs/configs/tiny.toml")
    torch.manual_seed(0)
    return save_checkpoint(uri, build_model(cfg), cfg, {"step": 0, "note": "random init"})


def tissue(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image (a random model gives it several classes in blobs)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    low = torch.rand((1, 3, max(2, height // 32), max(2, width // 32)), generator=g)
    img = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    noise = torch.rand((1, 3, height, width), generator=g) * 0.1
    return ((img * 0.8 + noise) * 255).clamp(0, 255).byte()[0].permute(1, 2, 0).numpy()


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_slide(img: np.ndarray, path: str) -> None:
    """A pyramidal tiled TIFF, lossless, so the slide's pixels are the image's."""
    import pyvips

    from foveation.io.slides import write_pyramid

    im = pyvips.Image.new_from_array(np.ascontiguousarray(img))
    write_pyramid(im, path, tile=128, compression="deflate", sqrt2=False)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_zero_size() -> bytes:
    """A PNG whose header declares 0 x 0 pixels."""
    ihdr = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def tiff_declaring(width: int, height: int) -> bytes:
    """A little TIFF whose header declares ``width`` x ``height`` 8-bit grey pixels (and holds
    none): decoding it would allocate width * height bytes."""
    entries = [
        (256, 4, 1, width),  # ImageWidth, LONG
        (257, 4, 1, height),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample, SHORT
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # Photometric: black is zero
        (273, 4, 1, 8),  # StripOffsets
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, 4_000_000_000),  # StripByteCounts
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        packed = struct.pack("<HHI", tag, typ, count)
        packed += struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        ifd += packed
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def wait_for(fn, timeout: float, interval: float = 0.25, what: str = "condition"):
    """Poll ``fn()`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def segment_load(port: int, token: str | None = None, clients: int = 8):
    """``clients`` threads posting a small PNG to /v1/segment until the block ends; yields
    the list of outcomes (status codes, or the httpx error's name: a hang ends as a
    timeout). On exit every client must have stopped: none hung."""
    import httpx

    body = png_bytes(tissue(64, 64))
    stop = threading.Event()
    outcomes: list[str] = []
    lock = threading.Lock()
    headers = {"Content-Type": "image/png"}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    def client():
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as c:
            while not stop.is_set():
                try:
                    got = str(c.post("/v1/segment", content=body).status_code)
                except httpx.HTTPError as exc:
                    got = type(exc).__name__
                with lock:
                    outcomes.append(got)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield outcomes
    finally:
        stop.set()
        for t in threads:
            t.join(90)
    assert not any(t.is_alive() for t in threads), "a client hung"


def wait_for_job(client, job_id: str, timeout: float = 90) -> dict:
    """The record of slide job ``job_id`` once it is final (``GET /v1/jobs/<id>``)."""
    from foveation.serving.jobstore import FINAL

    def final():
        rec = client.get(f"/v1/jobs/{job_id}").json()
        return rec if rec["state"] in FINAL else None

    return wait_for(final, timeout, 0.3, f"job {job_id}")
