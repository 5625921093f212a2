"""The backbone layer: `build_backbone(name)` -> a `Backbone` returning stride 4..32 features.

`name` is a torchvision classification model (resnet50, convnext_tiny, swin_t, swin_v2_t,
regnet_y_800mf, efficientnet_b0, mobilenet_v3_large, ...), `timm:NAME` (the timm extra), or one of
the project's own encoders (SegFormer's Mix Transformers mit_b0..mit_b5).
"""

from __future__ import annotations

from collections.abc import Sequence

from segtrain.models.backbones.common import STRIDES, Backbone, freeze_batch_norm

TIMM_PREFIX = "timm:"


def build_backbone(
    name: str,
    out_indices: Sequence[int] | None = None,
    output_stride: int = 32,
    frozen_stages: int = -1,
    frozen_bn: bool = False,
    weights: str | None = None,
    drop_path_rate: float | None = None,
) -> Backbone:
    """A feature pyramid over backbone `name`.

    out_indices: levels to return (0..3 = strides 4, 8, 16, 32; None = all four).
    output_stride: 8 or 16 dilates the deepest stages (ResNet family and most timm models).
    frozen_stages: -1 trains everything, 0 freezes the stem, k the stem and stages 1..k.
    frozen_bn: BatchNorm layers become FrozenBatchNorm2d (fixed statistics and affine).
    weights: ImageNet weights of the classifier: a local .pth/.pt/.safetensors file, a torchvision
        weights name found in the torch hub cache, or "cache" for timm's file in the local Hugging
        Face cache. Nothing is downloaded.
    drop_path_rate: stochastic depth of the transformer / ConvNeXt / EfficientNet families.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model.backbone={name!r}; expected a torchvision model name (e.g. "
                         "resnet50, convnext_tiny, swin_t), timm:NAME or mit_b0..mit_b5")
    options = {"out_indices": out_indices, "output_stride": output_stride, "frozen_stages": frozen_stages,
               "frozen_bn": frozen_bn, "weights": weights, "drop_path_rate": drop_path_rate}
    if name.startswith(TIMM_PREFIX):
        from segtrain.models.backbones.timm_backbones import TimmBackbone

        return TimmBackbone(name[len(TIMM_PREFIX):], **options)
    if name.startswith("mit_"):
        from segtrain.models.backbones.mit import MixTransformer

        return MixTransformer(name, **options)
    from segtrain.models.backbones.torchvision_backbones import TorchvisionBackbone

    return TorchvisionBackbone(name, **options)


__all__ = ["STRIDES", "TIMM_PREFIX", "Backbone", "build_backbone", "freeze_batch_norm"]
