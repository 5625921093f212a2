"""Spatial embeddings (Neven et al., CVPR 2019, "Instance Segmentation by Jointly Optimizing
Spatial Embeddings and Clustering Bandwidth"): a proposal-free instance segmenter.

The network is segtrain's U-Net (the small one, or a U-Net decoder over any backbone) with one
full-resolution output of `2 + n_sigma + num_things` channels: per pixel an offset (x, y) to its
instance's centre (tanh), `n_sigma` clustering-bandwidth channels (raw; the loss and the
clustering use exp(10 * sigma)) and one seed map per thing class (sigmoid). The official code
uses a branched ERFNet (one decoder for offsets + sigma, one for the seeds); a single decoder
with every output is our simplification. Activations are applied by the adapter
(`segtrain/tasks/spatial_embeddings.py`), so the model keeps the semantic `{"out": ...}`
contract and every encoder-decoder option.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segtrain.models.heads.unet import DECODER_CHANNELS
from segtrain.models.unet import build_unet


def output_layout(channels: int, num_things: int) -> tuple[int, int]:
    """(n_sigma, num_things) of a `channels`-wide output for `num_things` seed maps; raises when
    the model was built for another class count."""
    n_sigma = channels - 2 - num_things
    if n_sigma not in (1, 2):
        raise ValueError(
            f"spatial_embeddings: the model outputs {channels} channels; with {num_things} thing "
            f"classes it must be 2 offsets + 1 or 2 sigma + {num_things} seeds. Was it built for "
            "another dataset (model.num_classes / model.num_things)?"
        )
    return n_sigma, num_things


def build_spatial_embeddings(
    num_classes: int,
    num_things: int | None = None,
    n_sigma: int = 2,
    in_channels: int = 3,
    base_channels: int = 16,
    depth: int = 4,
    norm: str = "bn",
    weights: str | None = None,
    backbone: str | None = None,
    decoder_channels: Sequence[int] = DECODER_CHANNELS,
    weights_backbone: str | None = None,
    output_stride: int = 32,
    out_indices: Sequence[int] | None = None,
    frozen_stages: int = -1,
    frozen_bn: bool = False,
    drop_path_rate: float | None = None,
) -> nn.Module:
    """A U-Net (`build_unet`: backbone null = the small U-Net) predicting 2 offsets, `n_sigma`
    (1: one bandwidth, 2: one per axis) sigma maps and a seed map per thing class.

    `num_classes` is the dataset's; `num_things` the thing classes (null: num_classes - 1, an
    instance dataset whose class 0 is the background). Returns the U-Net, whose forward gives
    {"out": raw (N, 2 + n_sigma + num_things, H, W)} at the input's resolution.
    """
    things = num_classes - 1 if num_things is None else int(num_things)
    if things < 1 or n_sigma not in (1, 2):
        raise ValueError(f"spatial_embeddings: num_things={things}, n_sigma={n_sigma}; expected "
                         ">= 1 thing class and n_sigma 1 (isotropic) or 2 (per axis)")
    channels = 2 + n_sigma + things
    model = build_unet(channels, in_channels, base_channels, depth, norm, False, weights, backbone,
                       decoder_channels, weights_backbone, output_stride, out_indices,
                       frozen_stages, frozen_bn, drop_path_rate)
    if weights is None:
        init_output(model, channels, n_sigma)
    return model


def init_output(model: nn.Module, channels: int, n_sigma: int) -> None:
    """The official `init_output`: offsets start at 0 (every pixel its own centre) and sigma at
    a constant 1 (weights 0, bias 1), so every instance starts with the same bandwidth."""
    convs = [m for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.out_channels == channels and not name.startswith("aux")]
    output = convs[-1]
    with torch.no_grad():
        output.weight[: 2 + n_sigma].zero_()
        if output.bias is not None:
            output.bias[:2].zero_()
            output.bias[2: 2 + n_sigma].fill_(1.0)
