"""Segmentation models: `model(x float (N, 3, H, W)) -> {"out": logits, "aux"?: logits}`."""

from segtrain.models.backbones import build_backbone
from segtrain.models.encoder_decoder import (
    build_deeplabv3plus,
    build_fcn,
    build_pspnet,
    build_segformer,
    build_upernet,
)
from segtrain.models.torchvision_seg import build_torchvision_segmentation
from segtrain.models.unet import UNet, build_unet
from segtrain.models.weights import load_matching, load_state_dict_from_spec, resolve_weights

__all__ = [
    "UNet",
    "build_backbone",
    "build_deeplabv3plus",
    "build_fcn",
    "build_pspnet",
    "build_segformer",
    "build_unet",
    "build_upernet",
    "build_torchvision_segmentation",
    "load_matching",
    "load_state_dict_from_spec",
    "resolve_weights",
]
