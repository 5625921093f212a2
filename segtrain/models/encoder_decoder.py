"""Backbone + decode head (+ auxiliary FCN head) segmentation models and the builders the
conf/model YAMLs name: FCN, DeepLabV3+, PSPNet, UPerNet, SegFormer (the U-Net's is in unet.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from segtrain.models.backbones import Backbone, build_backbone
from segtrain.models.heads import (
    ClassifierHead,
    DeepLabV3PlusHead,
    FCNHead,
    PSPHead,
    SegFormerHead,
    UPerHead,
    aspp_dilations,
    resize,
)

log = logging.getLogger(__name__)

AUX_CHANNELS = 256  # mmseg's auxiliary FCN head: one 3x3 conv at 256 on the stride-16 level
PPM_BINS = (1, 2, 3, 6)


class EncoderDecoder(nn.Module):
    """`self.backbone` (parameters "backbone.*", the optimizer's backbone_lr_mult keys on it),
    `self.decode_head` on all its levels, optional `self.aux_head` (FCN on the second-deepest
    level). Logits are bilinearly upsampled to the input size."""

    def __init__(self, backbone: Backbone, decode_head: ClassifierHead,
                 aux_head: ClassifierHead | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.aux_head = aux_head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x float (N, 3, H, W), any H, W -> {"out": logits (N, num_classes, H, W)} plus "aux"
        of the same shape when the auxiliary head is on."""
        features = self.backbone(x)
        size = x.shape[-2:]
        result = {"out": resize(self.decode_head(features), size)}
        if self.aux_head is not None:
            result["aux"] = resize(self.aux_head(features), size)
        return result

    def load_weights(self, spec: str) -> None:
        """Load a whole-model state dict from `spec` (file or segtrain checkpoint), strictly
        except for the classifiers, which keep their fresh init when the class count differs, and
        the auxiliary head, which may be absent from the file or from the model."""
        from segtrain.models.weights import load_matching, load_state_dict_from_spec

        state_dict = load_state_dict_from_spec(spec, option="model.weights")
        file_aux = any(key.startswith("aux_head.") for key in state_dict)
        reinit: tuple[str, ...] = ("decode_head.classifier.", "aux_head.classifier.")
        ignore: tuple[str, ...] = ()
        if self.aux_head is not None and not file_aux:
            log.info("model.weights=%s has no auxiliary head: aux_head starts from random init", spec)
            reinit += ("aux_head.",)
        if self.aux_head is None and file_aux:
            ignore = ("aux_head.",)
        load_matching(self, state_dict, reinit_prefixes=reinit, ignore_prefixes=ignore,
                      source=f"model.weights={spec}")


@dataclass(frozen=True)
class BackboneOptions:
    """The model.* keys that every encoder-decoder builder hands to `build_backbone`."""

    name: str
    output_stride: int = 32
    out_indices: Sequence[int] | None = None
    frozen_stages: int = -1
    frozen_bn: bool = False
    drop_path_rate: float | None = None
    weights: str | None = None  # model.weights_backbone

    def build(self) -> Backbone:
        return build_backbone(self.name, out_indices=self.out_indices,
                              output_stride=self.output_stride, frozen_stages=self.frozen_stages,
                              frozen_bn=self.frozen_bn, weights=self.weights,
                              drop_path_rate=self.drop_path_rate)


def check_positive(model: str, **values: object) -> None:
    """ValueError naming the first key whose value is not an integer >= 1."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{model}: model.{key}={value!r}; expected an integer >= 1")


def assemble(model: str, options: BackboneOptions, make_head: Callable[[Backbone], ClassifierHead],
             num_classes: int, aux_head: bool, weights: str | None) -> EncoderDecoder:
    """Build the backbone, `make_head(backbone)`, the auxiliary FCN head when `aux_head`, then load
    `weights` (a whole-model state dict; it holds the backbone, so `options.weights` is skipped)."""
    if weights is not None and options.weights is not None:
        log.warning("%s: model.weights=%s already holds the backbone; ignoring "
                    "model.weights_backbone=%s", model, weights, options.weights)
        options = replace(options, weights=None)
    backbone = options.build()
    if aux_head and len(backbone.channels) < 2:
        raise ValueError(f"{model}: model.aux_head=true needs two feature levels (it reads the "
                         f"second deepest); model.out_indices={options.out_indices} gives one")
    aux = (FCNHead(backbone.channels, num_classes, AUX_CHANNELS, num_convs=1, concat_input=False,
                   in_index=-2) if aux_head else None)
    network = EncoderDecoder(backbone, make_head(backbone), aux)
    if weights is not None:
        network.load_weights(weights)
    return network


def build_fcn(num_classes: int, backbone: str = "resnet50", output_stride: int = 8,
              aux_head: bool = True, channels: int = 512, num_convs: int = 2,
              concat_input: bool = True, weights: str | None = None,
              weights_backbone: str | None = None, out_indices: Sequence[int] | None = None,
              frozen_stages: int = -1, frozen_bn: bool = False,
              drop_path_rate: float | None = None) -> EncoderDecoder:
    """FCN (mmseg's fcn_r50-d8): `num_convs` 3x3 convs at `channels` on the deepest level."""
    check_positive("fcn", num_classes=num_classes, channels=channels, num_convs=num_convs)
    options = BackboneOptions(backbone, output_stride, out_indices, frozen_stages, frozen_bn,
                              drop_path_rate, weights_backbone)
    return assemble("fcn", options, lambda b: FCNHead(b.channels, num_classes, channels, num_convs,
                                                      concat_input), num_classes, aux_head, weights)


def build_deeplabv3plus(num_classes: int, backbone: str = "resnet50", output_stride: int = 8,
                        aux_head: bool = True, channels: int = 512, weights: str | None = None,
                        weights_backbone: str | None = None,
                        out_indices: Sequence[int] | None = None, frozen_stages: int = -1,
                        frozen_bn: bool = False,
                        drop_path_rate: float | None = None) -> EncoderDecoder:
    """DeepLabV3+ (mmseg's deeplabv3plus_r50-d8): ASPP rates from the backbone's last stride
    (12, 24, 36 at 8; 6, 12, 18 at 16), decoder on the finest level."""
    check_positive("deeplabv3plus", num_classes=num_classes, channels=channels)
    options = BackboneOptions(backbone, output_stride, out_indices, frozen_stages, frozen_bn,
                              drop_path_rate, weights_backbone)
    return assemble("deeplabv3plus", options, lambda b: DeepLabV3PlusHead(
        b.channels, num_classes, aspp_dilations(b.strides[-1]), channels), num_classes, aux_head,
        weights)


def build_pspnet(num_classes: int, backbone: str = "resnet50", output_stride: int = 8,
                 aux_head: bool = True, channels: int = 512,
                 pool_scales: Sequence[int] = PPM_BINS, weights: str | None = None,
                 weights_backbone: str | None = None, out_indices: Sequence[int] | None = None,
                 frozen_stages: int = -1, frozen_bn: bool = False,
                 drop_path_rate: float | None = None) -> EncoderDecoder:
    """PSPNet (mmseg's pspnet_r50-d8): pyramid pooling with bins `pool_scales` on the deepest level."""
    check_positive("pspnet", num_classes=num_classes, channels=channels,
                   **{f"pool_scales[{i}]": s for i, s in enumerate(pool_scales)})
    options = BackboneOptions(backbone, output_stride, out_indices, frozen_stages, frozen_bn,
                              drop_path_rate, weights_backbone)
    return assemble("pspnet", options, lambda b: PSPHead(b.channels, num_classes, channels,
                                                         tuple(pool_scales)),
                    num_classes, aux_head, weights)


def build_upernet(num_classes: int, backbone: str = "resnet50", output_stride: int = 32,
                  aux_head: bool = True, channels: int = 512,
                  pool_scales: Sequence[int] = PPM_BINS, weights: str | None = None,
                  weights_backbone: str | None = None, out_indices: Sequence[int] | None = None,
                  frozen_stages: int = -1, frozen_bn: bool = False,
                  drop_path_rate: float | None = None) -> EncoderDecoder:
    """UPerNet (mmseg's upernet_r50, undilated; the Swin paper's with backbone=swin_t): PPM on the
    deepest level, FPN over all levels, fused at the finest."""
    check_positive("upernet", num_classes=num_classes, channels=channels,
                   **{f"pool_scales[{i}]": s for i, s in enumerate(pool_scales)})
    options = BackboneOptions(backbone, output_stride, out_indices, frozen_stages, frozen_bn,
                              drop_path_rate, weights_backbone)
    return assemble("upernet", options, lambda b: UPerHead(b.channels, num_classes, channels,
                                                           tuple(pool_scales)),
                    num_classes, aux_head, weights)


def segformer_channels(backbone: str) -> int:
    """The paper's decoder width: 256 for MiT-B0/B1, 768 for the larger encoders."""
    return 256 if backbone in ("mit_b0", "mit_b1") else 768


def build_segformer(num_classes: int, backbone: str = "mit_b0", decoder_channels: int | None = None,
                    aux_head: bool = False, weights: str | None = None,
                    weights_backbone: str | None = None, out_indices: Sequence[int] | None = None,
                    frozen_stages: int = -1, drop_path_rate: float | None = None) -> EncoderDecoder:
    """SegFormer: a MiT encoder (drop_path_rate null = the paper's 0.1) and the all-MLP decoder,
    `decoder_channels` wide (null = 256 for mit_b0/mit_b1, 768 otherwise)."""
    width = segformer_channels(backbone) if decoder_channels is None else decoder_channels
    check_positive("segformer", num_classes=num_classes, decoder_channels=width)
    options = BackboneOptions(backbone, 32, out_indices, frozen_stages, False, drop_path_rate,
                              weights_backbone)
    return assemble("segformer", options, lambda b: SegFormerHead(b.channels, num_classes, width),
                    num_classes, aux_head, weights)
