"""torch.distributed glue for `torchrun`: one code path, a no-op in a single process."""

from __future__ import annotations

import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(device_type: str) -> bool:
    """Initialise the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    if world_size() <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=10))
    return True


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this machine (torchrun's --nproc_per_node); 1 outside torchrun."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank (identity in a single process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's Python object, in rank order, on every rank ([obj] in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a float over ranks."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group, and with it gloo's worker threads, while Python is fully alive.

    DistributedDataParallel keeps the group alive through reference cycles; left to interpreter
    shutdown, gloo's threads can abort the process ("terminate called without an active exception")
    after a run that succeeded. Collecting first makes this the group's last reference.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
