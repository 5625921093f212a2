"""Feature-pyramid necks over any `segtrain.models.backbones` Backbone (detectors' multi-scale input)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from segtrain.models.backbones import Backbone


class BackboneFPN(nn.Module):
    """A Backbone (`self.body`) followed by an FPN (`self.fpn`), as torchvision's BackboneWithFPN.

    `forward(x float (N, 3, H, W))` returns an OrderedDict "0".."k-1" of (N, out_channels, h_i, w_i)
    maps, one per backbone level (finest first; for the default 4 levels P2..P5 at strides
    4..32), plus "pool" (P6, a stride-2 max pool of the coarsest level) for the RPN. torchvision's
    detectors read `out_channels`. `norm_layer` normalises the FPN's own convolutions
    (torchvision's v2 recipe: BatchNorm2d; None = plain convolutions with bias).
    """

    def __init__(self, body: Backbone, out_channels: int = 256,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.channels), out_channels, extra_blocks=LastLevelMaxPool(),
                                         norm_layer=norm_layer)
        self.out_channels = out_channels
        self.strides = [*body.strides, body.strides[-1] * 2]  # the "pool" level last

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        levels = self.body(x)
        return self.fpn(OrderedDict((str(i), level) for i, level in enumerate(levels)))
