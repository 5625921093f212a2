"""What every backbone shares: the feature-pyramid interface, BatchNorm freezing, stage freezing."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

STRIDES = (4, 8, 16, 32)  # the pyramid levels a backbone offers, out_indices 0..3


class Backbone(nn.Module):
    """A multi-scale feature extractor: `forward(x (N, 3, H, W)) -> list` of NCHW maps.

    `channels[i]` and `strides[i]` describe the i-th returned map (one per `out_indices` entry,
    finest first); a map's size is ceil(H / stride) or floor, as the network's convolutions give
    (the heads resize by the actual shapes, never by the nominal stride).
    """

    channels: list[int]
    strides: list[int]
    name: str
    frozen: tuple[str, ...] = ()  # names of submodules frozen by `freeze`

    def train(self, mode: bool = True) -> Backbone:
        """As nn.Module.train, except that frozen parts stay in eval mode (their BatchNorms keep
        the loaded statistics, as mmcv's `norm_eval` for frozen stages)."""
        super().train(mode)
        for name in self.frozen:
            self.get_submodule(name).eval()
        return self

    def freeze(self, names: Iterable[str]) -> None:
        """Stop training the submodules `names`: no gradients, eval-mode BatchNorm."""
        self.frozen = tuple(names)
        for name in self.frozen:
            for param in self.get_submodule(name).parameters():
                param.requires_grad_(False)
        self.train(self.training)


def check_out_indices(out_indices: Sequence[int] | None, available: int, name: str) -> list[int]:
    """`out_indices` as a sorted list of distinct levels in 0..available-1 (None = all)."""
    if out_indices is None:
        return list(range(available))
    indices = [int(i) for i in out_indices]
    if not indices or sorted(set(indices)) != indices or not all(0 <= i < available for i in indices):
        raise ValueError(f"model.out_indices={list(out_indices)} for backbone {name}; expected "
                         f"increasing distinct levels in 0..{available - 1} (strides "
                         f"{', '.join(map(str, STRIDES[:available]))})")
    return indices


def check_output_stride(output_stride: int, name: str, dilatable: bool) -> None:
    if output_stride not in (8, 16, 32):
        raise ValueError(f"model.output_stride={output_stride!r}; expected 8, 16 or 32")
    if output_stride != 32 and not dilatable:
        raise ValueError(f"model.output_stride={output_stride} needs a dilated backbone; {name} has "
                         "none here. Use a ResNet-family backbone (resnet*, resnext*, wide_resnet*) "
                         "or a timm:NAME backbone that supports output_stride, or output_stride=32")


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` by a FrozenBatchNorm2d holding its statistics and
    affine parameters (batch statistics are then never used nor updated, as detectron2's
    FrozenBN). Returns the module (a new one when `module` itself is a BatchNorm2d)."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = freeze_batch_norm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def check_frozen_stages(frozen_stages: int, num_stages: int, name: str) -> int:
    if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= num_stages:
        raise ValueError(f"model.frozen_stages={frozen_stages!r} for backbone {name}; expected -1 "
                         f"(train all), 0 (freeze the stem) .. {num_stages} (stem and stages 1..k)")
    return frozen_stages


@torch.no_grad()
def probe(forward, module: nn.Module, size: int = 64) -> list[torch.Tensor]:
    """Outputs of `forward` on a small grey image, in eval mode (so no BatchNorm statistic moves)."""
    was_training = module.training
    module.eval()
    try:
        return forward(torch.zeros(1, 3, size, size))
    finally:
        module.train(was_training)
