"""Segmentation models: `model(x float (N, 3, H, W)) -> {"out": logits, "aux"?: logits}`."""

from segtrain.models.torchvision_seg import build_torchvision_segmentation
from segtrain.models.unet import UNet
from segtrain.models.weights import load_matching, load_state_dict_from_spec, resolve_weights

__all__ = [
    "UNet",
    "build_torchvision_segmentation",
    "load_matching",
    "load_state_dict_from_spec",
    "resolve_weights",
]
