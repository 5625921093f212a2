"""Official Mask2Former checkpoints (facebookresearch/Mask2Former, detectron2) -> segtrain names.

The pixel decoder and transformer decoder already use the official names, so they only lose
the `sem_seg_head.` prefix. The backbones are renamed to the torchvision models segtrain runs:
detectron2's ResNet (`stem`, `res2`..`res5`, `convN.norm`, `shortcut`) and the Swin-Det Swin
(`patch_embed`, `layers.I.blocks.J`, `layers.I.downsample`, `norm0`..`norm3`). Both hold the
same tensors in the same layout as torchvision's (the official R50 is torchvision's R50 with
the stride in the 3x3 conv; Swin's patch merging concatenates the sub-patches in torchvision's
order), so nothing but the names changes, except Swin's `relative_position_index`, which
torchvision keeps flattened. No key is dropped silently: an unknown name raises ValueError.

Official checkpoints are pickles (`.pkl`: `{"model": {name: numpy array}, ...}`) and segtrain
never unpickles arbitrary files. Turn one into a tensor file once, in an environment you trust
(for a `.pth` that `torch.load(..., weights_only=True)` refuses, likewise keep its "model"):

    import pickle, torch
    with open("model_final.pkl", "rb") as f:
        state = pickle.load(f, encoding="latin1")["model"]
    torch.save({k: torch.as_tensor(v) for k, v in state.items()}, "m2f_official.pth")

then either `model.weights=m2f_official.pth` (`load_mask2former_weights` recognises the layout
with `is_official` and converts it on the fly), or convert the file once, e.g. to add the
background class (see `convert_official`):

    python -m segtrain.models.mask2former.convert m2f_official.pth m2f_segtrain.pth --insert-background

Swin-T and Swin-S checkpoints (window 7) fit torchvision's swin_t / swin_s; the official Swin-B/L
ones use window 12, which torchvision's Swin does not offer, and raise. The official models take
RGB images normalised by ImageNet's mean and std.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence

import torch

HEAD_PREFIXES = {"sem_seg_head.pixel_decoder.": "pixel_decoder.", "sem_seg_head.predictor.": "predictor."}
OFFICIAL_PREFIXES = ("sem_seg_head.", "backbone.stem.", "backbone.res2.", "backbone.patch_embed.",
                     "backbone.layers.")
# Buffers with no counterpart here: the loss's class weights (rebuilt from num_classes and
# no_object_weight by segtrain's criterion).
DROPPED = ("criterion.empty_weight",)
BODY, OUT_NORMS = "backbone.body.", "backbone.out_norms."
BACKGROUND_LOGIT = -100.0  # e^-100 against any logit a trained class gives: never the top class
SWIN_WINDOW = 7  # torchvision's Swin v1 window
_SHOWN = 5

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


def _layer(res: str) -> str:
    return f"layer{int(res) - 1}"


def _swin_stage(i: str) -> int:
    return 2 * int(i) + 1  # torchvision's features: 0 patch embed, then (stage, merging) pairs


_MLP = {"fc1": "0", "fc2": "3"}  # torchvision's MLP: Linear, GELU, Dropout, Linear, Dropout
_RULES: list[_Rule] = [
    # detectron2 ResNet
    (re.compile(r"backbone\.stem\.conv1\.weight"), lambda m: f"{BODY}conv1.weight"),
    (re.compile(rf"backbone\.stem\.conv1\.norm\.{_BN}"), lambda m: f"{BODY}bn1.{m[1]}"),
    (re.compile(r"backbone\.res([2-5])\.(\d+)\.conv([1-3])\.weight"),
     lambda m: f"{BODY}{_layer(m[1])}.{m[2]}.conv{m[3]}.weight"),
    (re.compile(rf"backbone\.res([2-5])\.(\d+)\.conv([1-3])\.norm\.{_BN}"),
     lambda m: f"{BODY}{_layer(m[1])}.{m[2]}.bn{m[3]}.{m[4]}"),
    (re.compile(r"backbone\.res([2-5])\.(\d+)\.shortcut\.weight"),
     lambda m: f"{BODY}{_layer(m[1])}.{m[2]}.downsample.0.weight"),
    (re.compile(rf"backbone\.res([2-5])\.(\d+)\.shortcut\.norm\.{_BN}"),
     lambda m: f"{BODY}{_layer(m[1])}.{m[2]}.downsample.1.{m[3]}"),
    # Swin-Det Swin
    (re.compile(r"backbone\.patch_embed\.proj\.(weight|bias)"), lambda m: f"{BODY}features.0.0.{m[1]}"),
    (re.compile(r"backbone\.patch_embed\.norm\.(weight|bias)"), lambda m: f"{BODY}features.0.2.{m[1]}"),
    (re.compile(r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj)\.(weight|bias)"),
     lambda m: f"{BODY}features.{_swin_stage(m[1])}.{m[2]}.{m[3]}.{m[4]}"),
    (re.compile(r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\."
                r"(relative_position_bias_table|relative_position_index)"),
     lambda m: f"{BODY}features.{_swin_stage(m[1])}.{m[2]}.attn.{m[3]}"),
    (re.compile(r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)"),
     lambda m: f"{BODY}features.{_swin_stage(m[1])}.{m[2]}.mlp.{_MLP[m[3]]}.{m[4]}"),
    (re.compile(r"backbone\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)"),
     lambda m: f"{BODY}features.{_swin_stage(m[1]) + 1}.{m[2]}"),
    (re.compile(r"backbone\.norm([0-3])\.(weight|bias)"), lambda m: f"{OUT_NORMS}{m[1]}.{m[2]}"),
]


def is_official(state_dict: Mapping[str, object]) -> bool:
    """Whether `state_dict` (already unwrapped from a "model" key, as `load_state_dict_from_spec`
    returns it) is in the official layout rather than segtrain's (whose backbone keys all
    start with `backbone.body.`)."""
    return any(key.startswith(OFFICIAL_PREFIXES) for key in state_dict)


def convert_official(state_dict: Mapping[str, torch.Tensor], insert_background: bool = False
                     ) -> dict[str, torch.Tensor]:
    """The official checkpoint `state_dict` under segtrain's names (same tensors, not copied).

    insert_background: official instance-segmentation checkpoints classify the dataset's thing
    classes (COCO: 80) + "no object", while segtrain's instance datasets count "background" as
    class 0 (COCO: 81 + 1 outputs). True inserts that class as row 0 of the class embedding,
    weight zero and bias BACKGROUND_LOGIT, so class k of the file becomes class k + 1 and the
    background class is never predicted. Leave False for semantic and panoptic checkpoints.
    Raises ValueError naming the keys it cannot map.
    """
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        new = _rename(key)
        if new is None:
            if key not in DROPPED:
                unknown.append(key)
            continue
        if new.endswith("attn.relative_position_bias_table"):
            _check_window(key, value)
        if new.endswith("attn.relative_position_index"):
            value = value.reshape(-1)  # official (W*W, W*W); torchvision keeps it flattened
        converted[new] = value
    if unknown:
        more = f" ... and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else ""
        raise ValueError(f"official Mask2Former checkpoint: no segtrain name for {len(unknown)} "
                         f"keys: {', '.join(unknown[:_SHOWN])}{more} (only the ResNet and Swin "
                         "backbones, the MSDeformAttn pixel decoder and the masked-attention "
                         "decoder convert)")
    if insert_background:
        _insert_background(converted)
    return converted


def _rename(key: str) -> str | None:
    for prefix, new in HEAD_PREFIXES.items():
        if key.startswith(prefix):
            return new + key[len(prefix):]
    for pattern, rename in _RULES:
        match = pattern.fullmatch(key)
        if match:
            return rename(match)
    return None


def _check_window(key: str, table: torch.Tensor) -> None:
    rows = (2 * SWIN_WINDOW - 1) ** 2
    if table.shape[0] != rows:
        window = (round(table.shape[0] ** 0.5) + 1) // 2
        raise ValueError(f"official Mask2Former checkpoint: {key} has {table.shape[0]} rows, a Swin "
                         f"with window {window}; segtrain's Swin backbones (torchvision's) use window "
                         f"{SWIN_WINDOW} ({rows} rows): only the window-7 checkpoints (Swin-T, "
                         "Swin-S) convert")


def _insert_background(state_dict: dict[str, torch.Tensor]) -> None:
    weight_key, bias_key = "predictor.class_embed.weight", "predictor.class_embed.bias"
    if weight_key not in state_dict or bias_key not in state_dict:
        raise ValueError("insert_background=True: the checkpoint has no sem_seg_head.predictor."
                         "class_embed weight and bias")
    weight, bias = state_dict[weight_key], state_dict[bias_key]
    state_dict[weight_key] = torch.cat([weight.new_zeros(1, weight.shape[1]), weight])
    state_dict[bias_key] = torch.cat([bias.new_full((1,), BACKGROUND_LOGIT), bias])


def main(argv: Sequence[str] | None = None) -> None:
    """Convert an official checkpoint's tensor file (see the module docstring) to segtrain's names."""
    from segtrain.models.weights import load_state_dict_from_spec

    parser = argparse.ArgumentParser(prog="python -m segtrain.models.mask2former.convert",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("source", help="official state dict: .pth (weights_only) or .safetensors")
    parser.add_argument("target", help="where to write the converted state dict (.pth)")
    parser.add_argument("--insert-background", action="store_true",
                        help="add class 0 'background' to an instance checkpoint's classifier")
    args = parser.parse_args(argv)
    if os.path.exists(args.target):
        parser.error(f"{args.target} exists; it is never overwritten: choose another target")
    state_dict = load_state_dict_from_spec(args.source, option="source")
    if not is_official(state_dict):
        parser.error(f"{args.source} is not in the official Mask2Former layout")
    torch.save(convert_official(state_dict, args.insert_background), args.target)


if __name__ == "__main__":
    main()
