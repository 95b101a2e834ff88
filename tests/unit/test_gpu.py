"""The paper-size path on a GPU (skipped without CUDA): HRNetV2-W48, five patches of 1100..4400
px resized to 1100, one training step on 4400 px images and tiled whole-image inference."""

import dataclasses
import time

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def paper_cfg(root):
    from foveation.config import load_config

    cfg = load_config(root / "jobs/configs/paper.toml")
    return dataclasses.replace(
        cfg, training=dataclasses.replace(cfg.training, locations_per_image=2, device="cuda")
    )


@pytest.fixture(scope="module")
def images():
    from foveation.data.toy import generate_image

    return [generate_image(4400, 2000, seed=i) for i in range(2)]


def test_paper_size_train_step_and_inference_on_gpu(paper_cfg, images):
    from foveation.data.batches import BatchExtractor, concat, sample_locations, to_torch
    from foveation.inference import ArraySink, ArraySource, segment
    from foveation.models import build_model
    from foveation.training.distributed import LocalEngine
    from foveation.training.step import train_step

    dev = torch.device("cuda")
    t0 = time.perf_counter()
    extractors = [
        BatchExtractor.from_arrays(paper_cfg, im, lab, f"p{i}")
        for i, (im, lab) in enumerate(images)
    ]
    batch = to_torch(
        concat(
            [
                ex.batch(sample_locations(ex.image, paper_cfg, 0, 0, f"p{i}"), f"p{i}")
                for i, ex in enumerate(extractors)
            ]
        )
    )
    t_prep = time.perf_counter() - t0
    model = build_model(paper_cfg).to(dev)
    n_params = sum(p.numel() for p in model.segmenter.parameters())
    assert 65.5e6 < n_params < 67e6
    torch.cuda.reset_peak_memory_stats()
    times, peaks = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = dataclasses.replace(
            paper_cfg, training=dataclasses.replace(paper_cfg.training, precision=precision)
        )
        engine = LocalEngine(model, cfg, 10, dev)
        torch.cuda.reset_peak_memory_stats()
        times[precision] = []
        for step in range(4):
            torch.cuda.synchronize()
            t = time.perf_counter()
            res = train_step(engine, batch, cfg, step, 10, dev)
            torch.cuda.synchronize()
            times[precision].append(time.perf_counter() - t)
            assert np.isfinite(float(res.loss)) and len(res.w) == 4
        peaks[precision] = torch.cuda.max_memory_allocated() / 2**30
    mpx = 4 * 1100 * 1100 / 1e6  # model-input megapixels per step
    speed = {p: mpx / min(t[1:]) for p, t in times.items()}
    # bf16 autocast forward of the same model: finite logits
    bank = extractors[0].bank([[20, 20]]).to(dev)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        model.eval()
        logits, _ = model(bank, torch.full((1, 5), 0.2, device=dev))
    assert logits.shape == (1, 4, 275, 275) and torch.isfinite(logits.float()).all()
    sink = ArraySink()
    t = time.perf_counter()
    stats = segment(model, ArraySource(images[0][0]), paper_cfg, sink, device=dev)
    t_inf = time.perf_counter() - t
    assert sink.mask.shape == (4400, 4400) and stats.forward_per_output < 1.3
    print(
        f"\nGPU {torch.cuda.get_device_name()}: prepare 2 images {t_prep:.1f}s; train step of 4 locations "
        f"(best of 3 after warm-up): fp32 {min(times['fp32'][1:]):.3f}s ({speed['fp32']:.1f} MP/s, peak "
        f"{peaks['fp32']:.1f} GiB), bf16 autocast {min(times['bf16'][1:]):.3f}s ({speed['bf16']:.1f} MP/s, peak "
        f"{peaks['bf16']:.1f} GiB), bf16/fp32 speed {speed['bf16'] / speed['fp32']:.2f}x; tiled inference 4400px "
        f"{t_inf:.1f}s, {stats.locations} locations, {stats.forward_per_output:.3f} forward px per output px"
    )
