"""The Serve app with its model on a GPU (skipped without CUDA): replicas ask Ray for a
fractional GPU each, /v1/segment matches in-process inference on the GPU."""

import httpx
import numpy as np
import pytest
import torch
from serve_helpers import png_bytes, tissue, write_checkpoint

from foveation.raycluster import init_ray

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_segment_on_a_gpu_replica(ray_cluster, serve_port, root, tmp_path):
    import io

    from PIL import Image
    from ray import serve

    from foveation.checkpoint import load_checkpoint
    from foveation.serving.runtime import segment_image
    from serve.app import AppArgs, build_app

    init_ray(address=ray_cluster)
    ckpt = write_checkpoint(str(tmp_path / "model"), root)
    settings = {
        "device": "cuda",
        "jobs": {"store": str(tmp_path / "jobs"), "allowed_prefixes": [str(tmp_path)]},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "model": {"num_cpus": 0.5, "num_gpus": 0.5},
        "runner": {"num_cpus": 0.5, "num_gpus": 0.5},
    }
    port = serve_port  # the session's Serve
    try:
        serve.run(build_app(AppArgs(checkpoint=ckpt, settings=settings)), name="fovgpu")
        img = tissue(256, 320, seed=5)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/segment",
            content=png_bytes(img),
            headers={"Content-Type": "image/png"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(r.content)))
        model, cfg, _ = load_checkpoint(ckpt, "cuda")
        want = segment_image(model, cfg, img, device="cuda").mask
        assert (got == want).mean() >= 0.999
    finally:
        serve.delete("fovgpu")
