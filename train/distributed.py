"""One process per device, started by `torchrun` (or a plain `python -m cavmae.train` for one process).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; we use NCCL on CUDA and gloo on CPU, so the same code runs the
2-process CPU test and an 8-GPU job. Without those variables everything is a no-op of world size 1.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init() -> torch.device:
    """Join the process group if launched by torchrun; return this process's device."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def cpu_threads(workers: int) -> int:
    """Without CUDA, lower torch's threads for this process to its share of the cores beside its `workers` loader
    processes and the other ranks of the host (torchrun's LOCAL_WORLD_SIZE), at least 1, and return them. torch's
    default, one thread per core, beside busy loader workers oversubscribes the cores: a tiny CPU step ran 10-40x
    slower than with one thread. OMP_NUM_THREADS, when set, is the user's choice and is left alone; so are GPU runs,
    where the step does not run on the CPU threads."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = cores // (int(os.environ.get("LOCAL_WORLD_SIZE", 1)) * (workers + 1))
    torch.set_num_threads(max(1, min(torch.get_num_threads(), share)))
    return torch.get_num_threads()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DistributedDataParallel / DataParallel / torch.compile wrappers (any nesting): the one
    whose attributes, methods and un-prefixed state dict the code means."""
    while True:
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging)."""
    if not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world_size()


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    """Maximum of a tensor over ranks (so that every rank takes the same decision from it)."""
    if not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, keeping gradients to the local part.

    `torch.distributed.nn.all_gather` back-propagates through the gather (each rank receives the gradient of its
    own slice summed over ranks), which is what a global-batch contrastive loss needs."""
    if not dist.is_initialized() or world_size() == 1:
        return x
    import torch.distributed.nn

    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (for evaluation outputs), in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
