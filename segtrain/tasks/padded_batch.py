"""Batches of images padded into one uint8 tensor (bottom/right, with 0), for the families whose
models take a stacked batch but whose targets stay per image (Mask2Former, spatial embeddings)."""

from __future__ import annotations

from typing import Any

import torch

from segtrain.utils.tensors import move_to


def pad_images(samples: list[tuple[Any, dict]], size_divisibility: int = 1
               ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """uint8 (N, 3, H, W) holding every sample's image at its top left, H and W the largest
    rounded up to `size_divisibility`; and each image's (H, W) before padding."""
    div = size_divisibility
    height = -(-max(image.shape[-2] for image, _ in samples) // div) * div
    width = -(-max(image.shape[-1] for image, _ in samples) // div) * div
    images = torch.zeros(len(samples), 3, height, width, dtype=torch.uint8)
    for i, (image, _) in enumerate(samples):
        images[i, :, : image.shape[-2], : image.shape[-1]] = image
    return images, [(int(image.shape[-2]), int(image.shape[-1])) for image, _ in samples]


class PaddedBatchTask:
    """The batch plumbing such tasks share: `images`, `sizes`, `targets` keys."""

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        return move_to(batch, device, non_blocking=device.type == "cuda")

    @staticmethod
    def images(batch: dict[str, Any]) -> list[torch.Tensor]:
        """Each image of a batch, uint8 (3, H, W), without its padding (for prediction writers)."""
        return [image[:, :h, :w] for image, (h, w) in zip(batch["images"], batch["sizes"])]

    @staticmethod
    def batch_size(batch: dict[str, Any]) -> int:
        return batch["images"].shape[0]
