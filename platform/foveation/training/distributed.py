"""The one place that touches DeepSpeed and torch.distributed (docs/architecture.md#rules).

The model code stays single-device; this module wraps it in an engine that the one training
loop (``training.loop``) drives the same way everywhere: a DeepSpeed engine configured from the
typed config (Ray Train workers, any number of ranks), or ``LocalEngine``, the same interface
over a plain optimiser on one device (the single-device trainer and the science check). It also
gives the loop the few collective operations it needs (no-ops outside a process group). Inside
a Ray Train worker the process group already exists (Ray's ``TorchConfig`` set it up);
DeepSpeed joins it instead of starting its own launcher.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from foveation.config import Config
from foveation.models.foveated import FoveatedSegmenter
from foveation.training.optim import build_optimizer
from foveation.training.speed import apply_speed_levers

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""``training.precision`` -> the autocast dtype (fp32: none). The one map of precision names."""


def autocast(precision: str, device: torch.device | str):
    """The forward's autocast context for ``training.precision`` (weights stay fp32)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


class LocalEngine:
    """A DeepSpeed engine's interface on one device without DeepSpeed: ``module``,
    ``optimizer``, a forward under the configured autocast, ``backward`` and ``step`` (clipping,
    optimiser, scheduler, zeroing), so one loop drives either."""

    def __init__(self, model: torch.nn.Module, cfg: Config, total_steps: int, device) -> None:
        tc = cfg.training
        if tc.precision == "fp16":
            raise ValueError(
                "training.precision 'fp16' runs only through DeepSpeed on GPUs (jobs.train, "
                "--trainer ray); the single-device trainer takes 'fp32' or 'bf16'"
            )
        self.device = torch.device(device)
        self.module = model.to(self.device)
        apply_speed_levers(self.module, tc, self.device)
        self.optimizer, self.lr_scheduler = build_optimizer(self.module, tc, total_steps)
        self.precision, self.grad_clip = tc.precision, tc.grad_clip

    def __call__(self, *args, **kwargs):
        with autocast(self.precision, self.device):
            return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> LocalEngine:
        self.module.train(mode)
        return self

    def eval(self) -> LocalEngine:
        return self.train(False)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()


def cpu_threads(threads_per_worker: int | None, local_workers: int) -> int | None:
    """Torch threads for one worker (``distributed.threads_per_worker``): None keeps Ray's rule
    (it set ``OMP_NUM_THREADS`` from the worker's CPUs); 0 shares the cores this process may run
    on among the ``local_workers`` on its node."""
    if threads_per_worker is None:
        return None
    if threads_per_worker:
        return threads_per_worker
    try:
        # taskset's or cpuset's cores, not the host's (a CPU quota, as Kubernetes limits set,
        # does not show here: set N there)
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_workers))


def deepspeed_config(cfg: Config) -> dict:
    """DeepSpeed's JSON config from ours: micro-batch, ZeRO stage, clipping, autocast.

    Mixed precision is torch autocast (weights and optimiser state stay fp32), not DeepSpeed's
    ``bf16`` section, which casts the weights and fails with BatchNorm on CPU
    (docs/dependencies.md)."""
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
        dtype = str(AUTOCAST_DTYPES[tc.precision]).removeprefix("torch.")
        out["torch_autocast"] = {"enabled": True, "dtype": dtype}
    return out


def init_engine(model: FoveatedSegmenter, cfg: Config, total_steps: int, device: torch.device):
    """A DeepSpeed engine over ``model`` with the paper's optimiser (per-module learning rates,
    weight decay on weights only) and poly decay, both built by ``training.optim``."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import deepspeed

    model = model.to(device)
    apply_speed_levers(model, cfg.training, device)
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


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_hosts(host: str) -> list[str]:
    """Every rank's host (``host`` is this rank's), by rank: the machines the process group
    spans, as the checkpoint's metadata records them ([host] outside a process group).
    Gathered through the process group itself, so two hosts here mean it crosses them."""
    return [str(h) for h in gather_all(host)]


def gather_all(value: Any) -> list:
    """Every rank's ``value``, by rank, through the process group ([value] outside one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


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
