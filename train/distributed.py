"""One process per device, started by `torchrun` (or a plain `python -m cavmae.train` for one process).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; we use NCCL on CUDA and gloo on CPU, so
the same code runs the 2-process CPU test and an 8-GPU job. Without RANK and WORLD_SIZE everything is a no-op of
world size 1.

The variables are checked before any rendezvous (`launch`): a RANK outside 0..WORLD_SIZE-1 would wait forever for
a peer that cannot exist, a missing MASTER_ADDR or a non-number would be a traceback; each is one line naming the
variable (exit 2). The rendezvous itself (every rank connecting to MASTER_ADDR:MASTER_PORT) waits at most
RENDEZVOUS_TIMEOUT_S, torchrun's own join timeout, then says which address and limit (torch's default is 30
minutes); collectives afterwards keep torch's default timeout (a long validation on rank 0 is not a hang).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from cavmae.shards.errors import UserError
from cavmae.shards.join import stderr_held, within

RENDEZVOUS_TIMEOUT_S = 600  # torchrun's default rendezvous join timeout


class LaunchError(UserError):
    """The process-group environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) cannot work, or the
    other ranks never joined (one line)."""


def init() -> torch.device:
    """Join the process group if launched by torchrun; return this process's device."""
    group = launch(os.environ)
    if group is not None and not dist.is_initialized():
        _rendezvous(*group)
    if torch.cuda.is_available():
        local = _number(os.environ, "LOCAL_RANK", 0)
        if local >= torch.cuda.device_count():
            raise LaunchError(f"LOCAL_RANK={local}: this machine has {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", local)
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
    share = cores // (max(1, _number(os.environ, "LOCAL_WORLD_SIZE", 1)) * (workers + 1))
    torch.set_num_threads(max(1, min(torch.get_num_threads(), share)))
    return torch.get_num_threads()


def launch(env: "os._Environ[str] | dict[str, str]") -> tuple[int, int, str] | None:
    """(rank, world size, "MASTER_ADDR:MASTER_PORT") from torchrun's variables, None without RANK and WORLD_SIZE
    (one process); LaunchError naming the variable when they cannot describe a process group."""
    if "RANK" not in env and "WORLD_SIZE" not in env:
        _number(env, "LOCAL_RANK", 0)
        return None
    if "RANK" not in env or "WORLD_SIZE" not in env:
        given, missing = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
        raise LaunchError(f"{given} is set but {missing} is not: start the processes with torchrun")
    world = _number(env, "WORLD_SIZE", None)
    rank = _number(env, "RANK", None)
    _number(env, "LOCAL_RANK", 0)
    if world < 1:
        raise LaunchError(f"WORLD_SIZE={world}: the number of processes is at least 1")
    if rank >= world:
        raise LaunchError(f"RANK={rank} with WORLD_SIZE={world}: ranks are 0..{world - 1}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name, "").strip():
            raise LaunchError(f"RANK and WORLD_SIZE are set but {name} is not: start the processes with torchrun")
    port = _number(env, "MASTER_PORT", None)
    if not 1 <= port <= 65535:
        raise LaunchError(f"MASTER_PORT={port}: not a port (1..65535)")
    return rank, world, f"{env['MASTER_ADDR']}:{port}"


def _number(env: "os._Environ[str] | dict[str, str]", name: str, default: int | None) -> int:
    """The non-negative integer in variable `name` (`default` when unset)."""
    text = env.get(name)
    if text is None and default is not None:
        return default
    if text is None or not text.strip().isdigit():
        raise LaunchError(f"{name}={text!r}: expected a non-negative integer (torchrun sets it)")
    return int(text)


def _rendezvous(rank: int, world: int, address: str) -> None:
    """Every rank meets at MASTER_ADDR:MASTER_PORT within RENDEZVOUS_TIMEOUT_S, then the process group forms."""
    limit = timedelta(seconds=RENDEZVOUS_TIMEOUT_S)

    def meet():  # rank 0 serves the store and waits for the others to connect; they retry until the limit
        return next(dist.rendezvous("env://", rank, world, timeout=limit))

    try:  # (`within`: a server that accepts and never answers would block a client past torch's limit)
        with stderr_held():  # (torch logs each failed try with a stack trace)
            store, _, _ = within(RENDEZVOUS_TIMEOUT_S + 5, meet, "the rendezvous")
    except (RuntimeError, OSError) as exc:  # torch's DistNetworkError, DistStoreError (RuntimeErrors); TimeoutError
        reason = " ".join(str(exc).split())[:200]
        raise LaunchError(f"rank {rank} of {world}: the processes did not all meet at {address} "
                          f"(MASTER_ADDR:MASTER_PORT) within {RENDEZVOUS_TIMEOUT_S} s ({reason})") from None
    store.set_timeout(dist.constants.default_pg_timeout)  # (what follows: torch's default, as without a store)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=store, rank=rank,
                            world_size=world)


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
