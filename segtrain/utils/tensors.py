"""Moving nested batches and predictions between devices."""

from __future__ import annotations

from typing import Any

import torch


def move_to(obj: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """`obj` with every tensor inside dicts, lists and tuples moved to `device`.

    A tensor reached twice (e.g. a target shared by two views of a batch) is moved once and
    stays shared. Other values are returned as they are.
    """
    moved: dict[int, torch.Tensor] = {}

    def move(value: Any) -> Any:
        if torch.is_tensor(value):
            if id(value) not in moved:
                moved[id(value)] = value.to(device, non_blocking=non_blocking)
            return moved[id(value)]
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(move(v) for v in value)
        return value

    return move(obj)


def to_cpu(obj: Any) -> Any:
    """Tensors moved to the CPU inside any nesting of lists, tuples and dicts (predictions)."""
    return move_to(obj, "cpu")
