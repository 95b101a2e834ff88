"""The one place that touches DeepSpeed and torch.distributed (DESIGN.md, rules of the house).

The model code stays single-device; this module wraps it in a DeepSpeed engine configured from
the typed config, and gives the worker loop the few collective operations it needs. Inside a
Ray Train worker the process group already exists (Ray's ``TorchConfig`` set it up); DeepSpeed
joins it instead of starting its own launcher.
"""

from __future__ import annotations

import os

import torch

from foveation.config import Config
from foveation.models.foveated import FoveatedSegmenter
from foveation.training.optim import build_optimizer

AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def deepspeed_config(cfg: Config) -> dict:
    """DeepSpeed's JSON config from ours: micro-batch, ZeRO stage, clipping, autocast.

    Mixed precision is torch autocast (weights and optimiser state stay fp32), not DeepSpeed's
    ``bf16`` section, which casts the weights and fails with BatchNorm on CPU (DESIGN.md)."""
    tc, dc = cfg.training, cfg.distributed
    out = {
        # Rows are locations: a step takes batch_size images' worth of locations per worker.
        "train_micro_batch_size_per_gpu": tc.batch_size * tc.locations_per_image,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": dc.zero_stage},
        "gradient_clipping": tc.grad_clip or 0.0,
        "steps_per_print": 1 << 30,  # our own progress lines, not DeepSpeed's
        "wall_clock_breakdown": False,
    }
    if tc.precision in AUTOCAST_DTYPES:
        out["torch_autocast"] = {"enabled": True, "dtype": AUTOCAST_DTYPES[tc.precision]}
    return out


def init_engine(model: FoveatedSegmenter, cfg: Config, total_steps: int, device: torch.device):
    """A DeepSpeed engine over ``model`` with the paper's optimiser (per-module learning rates,
    weight decay on weights only) and poly decay, both built by ``training.optim``."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import deepspeed

    model = model.to(device)
    optimizer, scheduler = build_optimizer(model, cfg.training, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg),
        dist_init_required=False,  # Ray Train's TorchConfig made the process group
    )
    return engine


def init_single_process_group(backend: str) -> None:
    """A one-rank process group, for DeepSpeed outside Ray Train (benchmarks, one GPU)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)  # DeepSpeed checks these, as its launcher sets them
    dist.init_process_group(backend, rank=0, world_size=1)


def train_step(engine, loss: torch.Tensor) -> None:
    """Backward, clipping, optimiser and scheduler step, zeroing: DeepSpeed's step."""
    engine.backward(loss)
    engine.step()


def learning_rates(engine) -> dict[str, float]:
    return {g.get("name", str(i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (``t`` itself outside a process group), on the device the backend
    needs (NCCL reduces CUDA tensors only), returned on ``t``'s device."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return t
    dev = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else t.device
    )
    out = t.to(dev)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank: DeepSpeed keeps the
    parameters in step but not the buffers, so without this each rank validates (and rank 0
    saves) a slightly different model."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for b in module.buffers():
        dist.broadcast(b.data, src=0)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_state(engine, directory: str) -> None:
    """DeepSpeed's own state (optimiser shards, scheduler, step) under ``directory``; every rank
    writes its shard. Only ``resume_state`` reads it, and only from checkpoints we wrote."""
    engine.save_checkpoint(directory, tag="state")


def resume_state(engine, directory: str) -> None:
    """Load what ``save_state`` wrote: model, optimiser (this rank's shard) and scheduler."""
    path, _ = engine.load_checkpoint(
        directory, tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"{directory}: no DeepSpeed state to resume from")
