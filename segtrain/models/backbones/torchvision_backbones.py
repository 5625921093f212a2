"""torchvision classification models as feature pyramids, run through their own stages.

No FX tracing: each family names the child modules it runs in order, and the outputs at the end
of each stride-4/8/16/32 stage are returned. The classifier is replaced by nn.Identity, so the
network keeps torchvision's parameter names (`body.<name>`) and its ImageNet files load as they
are (their classifier keys ignored).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, list_models
from torchvision.ops import StochasticDepth

from segtrain.models.backbones.common import (
    STRIDES,
    Backbone,
    check_frozen_stages,
    check_out_indices,
    check_output_stride,
    freeze_batch_norm,
    probe,
)
from segtrain.models.weights import load_matching, load_state_dict_from_spec

log = logging.getLogger(__name__)

# Family by name prefix: how its stages are found, and which classifier attributes it drops.
_RESNET = ("resnet", "resnext", "wide_resnet")
_FEATURES = ("convnext", "swin", "efficientnet", "mobilenet_v3", "mobilenet_v2")
FAMILIES = (*_RESNET, "regnet", *_FEATURES)
_DROPPED = {"resnet": ("fc",), "regnet": ("fc",), "convnext": ("classifier",),
            "swin": ("norm", "head"), "efficientnet": ("classifier",), "mobilenet": ("classifier",)}
_STOCHASTIC_DEPTH = ("convnext", "swin", "efficientnet")  # take stochastic_depth_prob


def family(name: str) -> str | None:
    """The backbone family of a torchvision model name, None when it is not a supported one."""
    for prefix in FAMILIES:
        if name.startswith(prefix):
            return "resnet" if prefix in _RESNET else prefix.split("_")[0]
    return None


def available() -> list[str]:
    """torchvision classification models usable as backbones."""
    return [n for n in list_models(module=torchvision.models) if family(n) is not None]


class TorchvisionBackbone(Backbone):
    """A torchvision classifier (`self.body`) returning its stride 4, 8, 16, 32 stage outputs.

    ResNets take `output_stride` 8 or 16 (the last one or two stages dilated instead of strided,
    as DeepLab's "D8"/"D16" backbones). Swin's channels-last outputs are normalised by one
    LayerNorm per returned level (as in the Swin paper's detection and segmentation code) and
    permuted to NCHW.
    """

    def __init__(self, name: str, out_indices: Sequence[int] | None = None, output_stride: int = 32,
                 frozen_stages: int = -1, frozen_bn: bool = False, weights: str | None = None,
                 drop_path_rate: float | None = None) -> None:
        super().__init__()
        kind = family(name)
        if kind is None or name not in list_models(module=torchvision.models):
            raise ValueError(f"model.backbone={name!r} is not a torchvision backbone; expected one of "
                             f"{', '.join(available())}, or timm:NAME")
        check_output_stride(output_stride, name, dilatable=kind == "resnet")
        if output_stride != 32 and name in ("resnet18", "resnet34"):
            raise ValueError(f"model.output_stride={output_stride}: torchvision's {name} (BasicBlock) "
                             f"cannot be dilated; use resnet50 or deeper, or timm:{name}")
        self.name = name
        kwargs: dict = {}
        if kind == "resnet" and output_stride != 32:
            kwargs["replace_stride_with_dilation"] = [False, output_stride == 8, True]
        if drop_path_rate is not None:
            if kind not in _STOCHASTIC_DEPTH:
                raise ValueError(f"model.drop_path_rate: backbone {name} has no stochastic depth; "
                                 "leave it null")
            if kind != "swin":  # torchvision's Swin builders fix it themselves: set below
                kwargs["stochastic_depth_prob"] = float(drop_path_rate)
        self.body = get_model(name, weights=None, **kwargs)
        if kind == "swin" and drop_path_rate is not None:
            _set_stochastic_depth(self.body, float(drop_path_rate))
        for attr in _DROPPED[kind]:
            setattr(self.body, attr, nn.Identity())
        self.stages = self._stages(kind)
        self.channels_last = kind == "swin"
        if kind == "efficientnet":  # its last feature layer is the classifier's 1x1 conv
            self.body.features[-1] = nn.Identity()
        if weights is not None:
            self._load(weights)
        self.out_indices = check_out_indices(out_indices, len(STRIDES), name)
        shapes = [f.shape for f in probe(self._pyramid, self)]
        channels = [s[-1] if self.channels_last else s[1] for s in shapes]
        self.out_norms = (nn.ModuleList(nn.LayerNorm(channels[i]) for i in self.out_indices)
                          if self.channels_last else None)
        self.channels = [channels[i] for i in self.out_indices]
        self.strides = [min(STRIDES[i], output_stride) for i in self.out_indices]
        if frozen_bn:
            freeze_batch_norm(self.body)
        check_frozen_stages(frozen_stages, len(self.stages) - 1, name)
        self.freeze(f"body.{child}" for stage in self.stages[:frozen_stages + 1] for child in stage)

    def _stages(self, kind: str) -> list[list[str]]:
        """The body's children in running order, split as [stem, stage 1, .., stage 4]."""
        if kind == "resnet":
            return [["conv1", "bn1", "relu", "maxpool"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
        if kind == "regnet":
            return [["stem"], *([f"trunk_output.block{i}"] for i in range(1, 5))]
        if kind in ("convnext", "swin"):  # features: 0 stem, then (stage, downsample) pairs
            return [["features.0"], ["features.1"], ["features.2", "features.3"],
                    ["features.4", "features.5"], ["features.6", "features.7"]]
        # EfficientNet / MobileNet: a stage ends at the last layer of each stride.
        layers = list(self.body.features)

        def each_layer(x: torch.Tensor) -> list[torch.Tensor]:
            outputs = []
            for layer in layers:
                x = layer(x)
                outputs.append(x)
            return outputs

        strides = [64 // f.shape[-1] for f in probe(each_layer, self.body, size=64)]
        last = len(layers) - (1 if kind == "efficientnet" else 0)
        stages: list[list[str]] = [[]]
        for i in range(last):
            stage = STRIDES.index(strides[i]) + 1 if strides[i] in STRIDES else 0
            while len(stages) <= stage:
                stages.append([])
            stages[stage].append(f"features.{i}")
        return stages

    def _pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for stage in self.stages:
            for child in stage:
                x = self.body.get_submodule(child)(x)
            outputs.append(x)
        return outputs[1:]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = self._pyramid(x)
        features = [levels[i] for i in self.out_indices]
        if self.out_norms is not None:
            features = [norm(f).permute(0, 3, 1, 2).contiguous() for norm, f in zip(self.out_norms, features)]
        return features

    def _load(self, weights: str) -> None:
        state_dict = load_state_dict_from_spec(weights, option="model.weights_backbone")
        own = self.body.state_dict()
        extra = tuple(sorted({key for key in state_dict if key not in own}))
        load_matching(self.body, state_dict, ignore_prefixes=extra,
                      source=f"model.weights_backbone={weights}")


def _set_stochastic_depth(model: nn.Module, rate: float) -> None:
    """Block i of n drops its residual branch with probability rate * i / (n - 1), the linear
    rule torchvision's Swin applies to its own `stochastic_depth_prob`."""
    layers = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    for i, layer in enumerate(layers):
        layer.p = rate * i / max(len(layers) - 1, 1)
