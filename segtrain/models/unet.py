"""A small U-Net for semantic segmentation that returns torchvision-style `{"out", "aux"}` dicts,
and `build_unet`, which also gives a U-Net decoder over any backbone (a Res-U-Net)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.models.heads.unet import DECODER_CHANNELS, UNetHead

log = logging.getLogger(__name__)

NORMS = ("bn", "gn", "none")


def _group_count(channels: int) -> int:
    """GroupNorm groups: up to 32 groups of >= 4 channels each, always a divisor of `channels`."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(_group_count(channels), channels)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Two (3x3 conv -> norm -> ReLU) layers; spatial size unchanged."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        # A bias in front of a normalisation layer is cancelled by its mean subtraction.
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class UNetEncoder(nn.Module):
    """Contracting path: `depth + 1` levels, the width doubling at each 2x max-pool."""

    def __init__(self, in_channels: int, widths: list[int], norm: str) -> None:
        super().__init__()
        stages = [ConvBlock(in_channels, widths[0], norm)]
        for prev, width in zip(widths[:-1], widths[1:]):
            stages.append(nn.Sequential(nn.MaxPool2d(2), ConvBlock(prev, width, norm)))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x float (N, C_in, H, W), H and W divisible by 2**depth -> one feature map per level,
        finest first: level i is (N, widths[i], H / 2**i, W / 2**i)."""
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class UpBlock(nn.Module):
    """Double the resolution, concatenate the encoder's skip features, fuse with a ConvBlock."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        # A 2x2 stride-2 transposed conv doubles the size exactly (the input is padded to a
        # multiple of 2**depth), is cheaper than bilinear upsampling followed by a wider fusion
        # conv, and, unlike bilinear's backward on CUDA, has a deterministic implementation.
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.fuse = ConvBlock(2 * out_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """U-Net (Ronneberger et al., 2015) with same-padded convs and optional auxiliary head.

    Encoder widths are `base_channels * 2**i` for i = 0..depth; the encoder is `self.backbone`,
    so its parameters are named `backbone.*`. Inputs of any size are zero-padded on the bottom and
    right to a multiple of 2**depth and the logits cropped back; after the task's normalisation a
    zero is the mean colour, so the padding looks like a plain border.

    `weights` (optional) is a local file or torchvision weights name resolved by
    `segtrain.models.weights`; a head trained for another class count is re-initialised.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        base_channels: int = 8,
        depth: int = 4,
        norm: str = "bn",
        aux_head: bool = False,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        for key, value, low in (("num_classes", num_classes, 1), ("in_channels", in_channels, 1),
                                ("base_channels", base_channels, 1), ("depth", depth, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"UNet: {key}={value!r}; expected an integer >= {low}")
        if norm not in NORMS:
            raise ValueError(f"UNet: norm={norm!r}; expected one of {', '.join(NORMS)}")
        self.num_classes, self.depth = num_classes, depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.backbone = UNetEncoder(in_channels, widths, norm)
        self.decoder = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], norm) for i in reversed(range(depth))
        )
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)
        self.aux_classifier = None
        if aux_head:
            deep = widths[-1]
            self.aux_classifier = nn.Sequential(
                nn.Conv2d(deep, deep // 4 or 1, 3, padding=1, bias=norm == "none"),
                _norm(norm, deep // 4 or 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(deep // 4 or 1, num_classes, 1),
            )
        self._init_weights()
        if weights is not None:
            self.load_weights(weights)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                # He init keeps activation variance steady through ReLUs, which matters with
                # norm="none" where nothing else rescales them.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def head_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the layers whose shape depends on `num_classes`."""
        prefixes = ("classifier.",)
        if self.aux_classifier is not None:
            prefixes += (f"aux_classifier.{len(self.aux_classifier) - 1}.",)
        return prefixes

    def load_weights(self, spec: str) -> None:
        """Load a state dict from `spec` (file or torchvision weights name), strictly except
        for the class-count-dependent head, which keeps its fresh init when shapes differ."""
        from segtrain.models.weights import load_matching, load_state_dict_from_spec

        state_dict = load_state_dict_from_spec(spec, option="model.weights")
        has_aux = any(key.startswith("aux_classifier.") for key in state_dict)
        reinit = self.head_prefixes()
        ignore: tuple[str, ...] = ()
        if self.aux_classifier is not None and not has_aux:
            reinit += ("aux_classifier.",)
        if self.aux_classifier is None and has_aux:
            ignore = ("aux_classifier.",)
        load_matching(self, state_dict, reinit_prefixes=reinit, ignore_prefixes=ignore,
                      source=spec)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x float (N, C_in, H, W), any H, W >= 1 -> {"out": logits (N, num_classes, H, W)}
        plus "aux" of the same shape when the auxiliary head is on."""
        height, width = x.shape[-2:]
        multiple = 2**self.depth
        pad_h, pad_w = -height % multiple, -width % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        features = self.backbone(x)
        y = features[-1]
        for block, skip in zip(self.decoder, reversed(features[:-1])):
            y = block(y, skip)
        result = {"out": self.classifier(y)[..., :height, :width]}
        if self.aux_classifier is not None:
            aux = self.aux_classifier(features[-1])
            aux = F.interpolate(aux, size=x.shape[-2:], mode="bilinear", align_corners=False)
            result["aux"] = aux[..., :height, :width]
        return result


# Keys of the small U-Net that a backbone replaces, with their defaults.
_SMALL_UNET_ONLY = {"base_channels": 8, "depth": 4, "norm": "bn"}


def build_unet(
    num_classes: int,
    in_channels: int = 3,
    base_channels: int = 8,
    depth: int = 4,
    norm: str = "bn",
    aux_head: bool = False,
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
    """The small `UNet` (backbone null), or a Res-U-Net: `build_backbone(backbone)` with a U-Net
    decoder (as segmentation_models.pytorch's Unet, `decoder_channels` wide) in an EncoderDecoder.

    Both return {"out": logits (N, num_classes, H, W)} (+ "aux") for x float (N, 3, H, W).
    A backbone-only key set without a backbone is an error. With a backbone, base_channels, depth
    and norm are ignored with a warning rather than refused: conf/tuned/ sets base_channels for
    the small U-Net of the default composition, which `model.backbone=...` alone must not break.
    """
    backbone_only = {"decoder_channels": (list(decoder_channels), list(DECODER_CHANNELS)),
                     "weights_backbone": (weights_backbone, None),
                     "output_stride": (output_stride, 32), "out_indices": (out_indices, None),
                     "frozen_stages": (frozen_stages, -1), "frozen_bn": (frozen_bn, False),
                     "drop_path_rate": (drop_path_rate, None)}
    if backbone is None:
        unused = [key for key, (value, default) in backbone_only.items() if value != default]
        if unused:
            raise ValueError(f"unet: model.{unused[0]} only applies with a backbone; set "
                             "model.backbone (e.g. resnet34) or leave it at its default")
        return UNet(num_classes, in_channels, base_channels, depth, norm, aux_head, weights)
    if in_channels != 3:
        raise ValueError(f"unet: model.in_channels={in_channels!r}; a backbone takes RGB images, "
                         "so 3 (or model.backbone=null for the small U-Net)")
    given = {"base_channels": base_channels, "depth": depth, "norm": norm}
    ignored = {key: value for key, value in given.items() if value != _SMALL_UNET_ONLY[key]}
    if ignored:
        log.warning("unet: model.backbone=%s has its own encoder and a BatchNorm decoder; ignoring "
                    "the small U-Net's %s", backbone,
                    ", ".join(f"model.{key}={value}" for key, value in ignored.items()))
    from segtrain.models.encoder_decoder import BackboneOptions, assemble, check_positive

    check_positive("unet", num_classes=num_classes,
                   **{f"decoder_channels[{i}]": c for i, c in enumerate(decoder_channels)})
    options = BackboneOptions(backbone, output_stride, out_indices, frozen_stages, frozen_bn,
                              drop_path_rate, weights_backbone)

    def make_head(encoder: nn.Module) -> UNetHead:
        # Blocks without skip bring the finest level (stride 4 usually) back to full resolution.
        upsamplings = max(0, int(encoder.strides[0]).bit_length() - 1)
        return UNetHead(encoder.channels, num_classes, upsamplings, decoder_channels)

    return assemble("unet", options, make_head, num_classes, aux_head, weights)
