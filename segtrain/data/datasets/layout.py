"""What the loaders of official on-disk layouts share: the root check, the target, size checks."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torchvision import tv_tensors


def require_root(name: str, root: str | os.PathLike | None, tree: Callable[[Any], str], what: str) -> Path:
    """`root` as a Path; ValueError when unset, FileNotFoundError when not a directory, each with
    the expected layout (`tree(root)`). what: the data the user should point at, e.g. "cityscapes"."""
    if root is None:
        raise ValueError(f"{name}: root is not set; pass dataset.root=/path/to/{what} holding\n{tree(None)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: root {root} is not a directory; expected\n{tree(root)}")
    return root


def semantic_target(
    label: torch.Tensor, index: int, stem: str, dtype: torch.dtype = torch.int64
) -> dict[str, Any]:
    """The target dict of a semantic item: label (H, W) of train ids, 255 = ignore, as `dtype`.

    int64 is the item contract. A loader may keep uint8 (4-8x less memory traffic through the
    resize, crop and flip) and call `int64_semantic` once after its transforms.
    """
    return {
        "semantic": tv_tensors.Mask(label.to(dtype).contiguous()),
        "image_id": index,
        "orig_size": torch.tensor(label.shape[-2:], dtype=torch.int64),
        "file_name": stem,
    }


def int64_semantic(target: dict[str, Any]) -> dict[str, Any]:
    """`target` with `semantic` as the item contract's `tv_tensors.Mask` int64 (H, W)."""
    semantic = target["semantic"]
    if semantic.dtype == torch.int64:
        return target
    return {**target, "semantic": tv_tensors.Mask(semantic.as_subclass(torch.Tensor).to(torch.int64))}


def check_same_size(image: torch.Tensor, label: torch.Tensor, image_path: Path, label_path: Path) -> None:
    """ValueError naming both files when the label map's (H, W) differs from the image's."""
    if tuple(image.shape[-2:]) != tuple(label.shape[-2:]):
        raise ValueError(
            f"{label_path} is {tuple(label.shape[-2:])} (H, W) but its image {image_path} is "
            f"{tuple(image.shape[-2:])}; expected a label map of the image's size"
        )
