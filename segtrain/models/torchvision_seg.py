"""Builders for torchvision's semantic segmentation models, with weights loaded offline."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torchvision.models import segmentation

from segtrain.models.weights import load_matching, load_state_dict_from_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Spec:
    build: Callable[..., nn.Module]
    head_layers: tuple[str, ...]  # state-dict prefixes whose shape depends on num_classes
    has_aux: bool
    backbone_rename: tuple[str, str]  # (classifier-file prefix, prefix under model.backbone)
    backbone_extra: str  # classifier-file prefix of layers the segmentation backbone drops


# FCNHead and DeepLabHead are Sequentials whose last layer (index 4) is the 1x1 classifier.
_RESNET = {"head_layers": ("classifier.4.", "aux_classifier.4."), "has_aux": True,
           "backbone_rename": ("", ""), "backbone_extra": "fc."}
# torchvision keeps only `mobilenet_v3_large().features` as the backbone.
_MOBILENET = {"backbone_rename": ("features.", ""), "backbone_extra": "classifier."}

MODELS: dict[str, _Spec] = {
    "fcn_resnet50": _Spec(segmentation.fcn_resnet50, **_RESNET),
    "deeplabv3_resnet50": _Spec(segmentation.deeplabv3_resnet50, **_RESNET),
    "deeplabv3_resnet101": _Spec(segmentation.deeplabv3_resnet101, **_RESNET),
    "deeplabv3_mobilenet_v3_large": _Spec(
        segmentation.deeplabv3_mobilenet_v3_large, ("classifier.4.", "aux_classifier.4."), True,
        **_MOBILENET),
    "lraspp_mobilenet_v3_large": _Spec(
        segmentation.lraspp_mobilenet_v3_large,
        ("classifier.low_classifier.", "classifier.high_classifier."), False, **_MOBILENET),
}


def build_torchvision_segmentation(
    name: str,
    num_classes: int,
    aux_loss: bool = False,
    weights: str | None = None,
    weights_backbone: str | None = None,
    **kwargs: object,
) -> nn.Module:
    """A torchvision segmentation model: `model(x float (N, 3, H, W))` returns
    {"out": logits (N, num_classes, H, W)} plus "aux" (same shape) when `aux_loss`.

    `weights` (whole model) and `weights_backbone` (ImageNet classifier) are local files or
    torchvision weights names found in the torch hub cache; nothing is downloaded. A head trained
    for a different class count is re-initialised, the rest loaded strictly. `weights` covers the
    backbone, so `weights_backbone` is then ignored, as in torchvision. torchvision's builders
    silently ignore unknown keyword arguments, so any `kwargs` are rejected instead. With
    neither `weights` nor `weights_backbone`, BatchNorm momenta are raised to 0.1 (MobileNetV3's
    0.01 assumes pretrained statistics; see `_from_scratch_bn_momentum`).
    """
    if name not in MODELS:
        raise ValueError(f"unknown torchvision segmentation model {name!r}; expected one of "
                         f"{', '.join(MODELS)}")
    spec = MODELS[name]
    if aux_loss and not spec.has_aux:
        raise ValueError(f"model {name} has no auxiliary head; set model.aux_loss=false")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{name}: num_classes={num_classes!r}; expected an integer >= 1")
    if kwargs:
        raise ValueError(f"{name}: unexpected options {sorted(kwargs)}; expected only name, "
                         "num_classes, aux_loss, weights, weights_backbone")
    # Only the aux flag is passed for models that have one: lraspp rejects even aux_loss=False.
    extra = {"aux_loss": aux_loss} if spec.has_aux else {}
    model = spec.build(weights=None, weights_backbone=None, num_classes=num_classes, **extra)
    if weights is None and weights_backbone is None:
        _from_scratch_bn_momentum(model)
    if weights is not None:
        if weights_backbone is not None:
            log.warning("%s: model.weights=%s already holds the backbone; ignoring "
                        "model.weights_backbone=%s", name, weights, weights_backbone)
        _load_full(model, spec, weights)
    elif weights_backbone is not None:
        _load_backbone(model, spec, weights_backbone)
    return model


# BatchNorm momentum of models trained from scratch (PyTorch's default).
FROM_SCRATCH_BN_MOMENTUM = 0.1


def _from_scratch_bn_momentum(model: nn.Module) -> None:
    """Raise BatchNorm momenta below FROM_SCRATCH_BN_MOMENTUM to it (MobileNetV3's 0.01).

    torchvision's MobileNetV3 keeps TF's BatchNorm decay, momentum 0.01, made for fine-tuning
    from pretrained statistics. From scratch, the running variance starts at 1 and its depthwise
    layers' true variance is ~1e-3, so after n iterations the initial 1 still weighs 0.99**n
    (5% after 300): each depthwise output is shrunk several-fold in eval mode, the shrinkage
    compounds over 15 blocks and the eval-mode model predicts one class (issue 13; figures in
    docs/BENCHMARKS.md). At 0.1 the initial value weighs 0.9**n (3e-5 after 100).
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None:
            module.momentum = max(module.momentum, FROM_SCRATCH_BN_MOMENTUM)


def _load_full(model: nn.Module, spec: _Spec, weights: str) -> None:
    state_dict = load_state_dict_from_spec(weights, option="model.weights")
    model_aux = getattr(model, "aux_classifier", None) is not None
    file_aux = any(key.startswith("aux_classifier.") for key in state_dict)
    reinit, ignore = spec.head_layers, ()
    if model_aux and not file_aux:
        log.info("model.weights=%s has no auxiliary head: aux_classifier starts from random init",
                 weights)
        reinit += ("aux_classifier.",)
    elif file_aux and not model_aux:
        ignore = ("aux_classifier.",)
    load_matching(model, state_dict, reinit_prefixes=reinit, ignore_prefixes=ignore,
                  source=f"model.weights={weights}")


def _load_backbone(model: nn.Module, spec: _Spec, weights_backbone: str) -> None:
    state_dict = load_state_dict_from_spec(weights_backbone, option="model.weights_backbone")
    old, new = spec.backbone_rename
    renamed = {(new + key[len(old):] if key.startswith(old) else key): value
               for key, value in state_dict.items()}
    load_matching(model.backbone, renamed, ignore_prefixes=(spec.backbone_extra,),
                  source=f"model.weights_backbone={weights_backbone}")
