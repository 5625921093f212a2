"""Small wrappers over torch.distributed that behave as a single process when it is not in use.

They never import torch themselves: a process that has not imported torch.distributed cannot
be in a process group, and tools such as `segtrain score` should not pay torch's start-up.
"""

from __future__ import annotations

import atexit
import logging
import os
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


def launched_distributed() -> bool:
    """True when a launcher (torchrun) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group_from_env() -> bool:
    """Join the process group torchrun describes in the environment; False when not launched so.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (`env://`), which torchrun
    sets on every node after its rendezvous, so multi-node runs need nothing more. With CUDA the
    group is `cpu:gloo,cuda:nccl` (NCCL for gradients on the GPU, gloo for CPU tensors and
    objects: evaluator state, the run directory's timestamp) and this process's GPU becomes
    `cuda:LOCAL_RANK`; without CUDA it is gloo.
    """
    if not launched_distributed():
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, init_method="env://")
    return True


def join_launched_group() -> None:
    """Join the group the environment describes when nothing did yet, for `train` and `eval`.

    `cli.main` joins under torchrun; a SLURM task started by submitit runs the Hydra job
    directly, with RANK/WORLD_SIZE/MASTER_ADDR from the launcher preset. Ranks > 0 then log
    warnings only, to the console (the file handler Hydra gave them removed), as under torchrun.
    """
    if _group() is not None or not init_process_group_from_env():
        return
    atexit.register(destroy_process_group)
    if is_main_process():
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.WARNING)


def destroy_process_group() -> None:
    """Leave the process group, if this process is in one (safe to call on any path out)."""
    dist = _group()
    if dist is not None:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here; a no-op when not distributed."""
    dist = _group()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` (picklable) on every rank; `obj` itself when not distributed."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors(tensors: Any, src: int = 0) -> None:
    """Overwrite each tensor in place with rank `src`'s values (e.g. BatchNorm running stats)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    for tensor in tensors:
        dist.broadcast(tensor, src=src)


def any_rank(flag: int, device: torch.device) -> int:
    """The largest of every rank's `flag` (0 = nothing to report): one small all-reduce."""
    if not is_distributed():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([flag], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())
