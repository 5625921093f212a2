"""Small wrappers over torch.distributed that behave as a single process when it is not in use.

They never import torch themselves: a process that has not imported torch.distributed cannot
be in a process group, and tools such as `segtrain score` should not pay torch's start-up.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _group() -> Any:
    """torch.distributed when a process group is initialised, else None."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    dist = _group()
    return dist is not None and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank; 0 when not distributed."""
    dist = _group()
    return dist.get_rank() if dist is not None else 0


def get_world_size() -> int:
    """Number of processes in the group; 1 when not distributed."""
    dist = _group()
    return dist.get_world_size() if dist is not None else 1


def is_main_process() -> bool:
    """True on rank 0, the rank that logs and writes files."""
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place, and return it; unchanged when not distributed.

    NCCL only reduces CUDA tensors, so under NCCL a CPU tensor makes a round trip through the
    current CUDA device (evaluator state is small, the copy is cheap).
    """
    if not is_distributed():
        return tensor
    import torch
    import torch.distributed as dist

    if dist.get_backend() == dist.Backend.NCCL and tensor.device.type != "cuda":
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        tensor.copy_(on_device)
        return tensor
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; `[obj]` when not distributed."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
