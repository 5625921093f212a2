"""timm models as feature pyramids (`model.backbone=timm:NAME`), an optional extra.

timm's `features_only` models report their levels (`feature_info`); segtrain keeps those at
strides 4..32. Weights come from a local file or timm's local Hugging Face cache, never the network.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from segtrain.models.backbones.common import (
    STRIDES,
    Backbone,
    check_frozen_stages,
    check_out_indices,
    check_output_stride,
    freeze_batch_norm,
    probe,
)
from segtrain.models.weights import hub_checkpoint_dir, load_state_dict_from_spec

log = logging.getLogger(__name__)

FROM_CACHE = "cache"  # model.weights_backbone=cache: timm's pretrained file from the local HF cache


def _timm():
    try:
        import timm
    except ImportError as err:
        raise ImportError("model.backbone=timm:NAME needs timm: pip install 'segtrain[timm]'") from err
    return timm


class TimmBackbone(Backbone):
    """`timm.create_model(name, features_only=True)`, its stride-4..32 levels as NCHW maps."""

    def __init__(self, name: str, out_indices: Sequence[int] | None = None, output_stride: int = 32,
                 frozen_stages: int = -1, frozen_bn: bool = False, weights: str | None = None,
                 drop_path_rate: float | None = None) -> None:
        super().__init__()
        timm = _timm()
        if name not in timm.list_models():
            close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
            raise ValueError(f"model.backbone=timm:{name}: timm has no such model"
                             + (f"; similar: {', '.join(close)}" if close else ""))
        check_output_stride(output_stride, f"timm:{name}", dilatable=True)
        self.name = f"timm:{name}"
        kwargs: dict = {"features_only": True}
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = float(drop_path_rate)
        if weights is not None:
            # timm loads the file into the whole classifier (its own key filters apply) before
            # cutting it into stages; the file itself is read here, safely (weights_only).
            path = _cached_file(timm, name) if weights == FROM_CACHE else weights
            state_dict = load_state_dict_from_spec(str(path), option="model.weights_backbone")
            kwargs["pretrained_cfg_overlay"] = {"state_dict": state_dict}
        try:
            self.body = timm.create_model(name, pretrained=weights is not None, **kwargs)
        except RuntimeError as err:  # load_state_dict's key and shape mismatches
            raise ValueError(f"model.weights_backbone={weights}: does not fit timm's {name}: {err}") from err
        info = self.body.feature_info
        reductions = list(info.reduction())
        # Levels at strides 4..32 (a stride-2 stem level is skipped); with dilation the deepest
        # levels share the output stride: the last len(STRIDES) levels are kept.
        self.levels = [i for i, r in enumerate(reductions) if r >= STRIDES[0]][-len(STRIDES):]
        self.out_indices = check_out_indices(out_indices, len(self.levels), self.name)
        channels = list(info.channels())
        try:
            shapes = [f.shape for f in probe(self.body, self)]
        except (AssertionError, RuntimeError):  # a fixed input size (timm's ViT/Swin patch embeds)
            size = self.body.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
            shapes = [f.shape for f in probe(self.body, self, size)]
        # Some timm families (Swin, ...) return channels-last maps.
        self.channels_last = [s[1] != channels[i] and s[-1] == channels[i] for i, s in enumerate(shapes)]
        self.channels = [channels[self.levels[i]] for i in self.out_indices]
        self.strides = [reductions[self.levels[i]] for i in self.out_indices]
        if frozen_bn:
            freeze_batch_norm(self.body)
        children = [n for n, _ in self.body.named_children()]
        check_frozen_stages(frozen_stages, len(self.levels), self.name)
        if frozen_stages >= 0:
            # timm names the module that produces each level; freeze every child up to it.
            modules = [_child_of(info.module_name()[i], children) for i in self.levels]
            stem_end = children.index(modules[0]) if modules[0] in children else 0
            end = stem_end if frozen_stages == 0 else children.index(modules[frozen_stages - 1]) + 1
            self.freeze(f"body.{c}" for c in children[:end])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = self.body(x)
        features = []
        for i in self.out_indices:
            level = self.levels[i]
            f = levels[level]
            features.append(f.permute(0, 3, 1, 2).contiguous() if self.channels_last[level] else f)
        return features


def _child_of(module_name: str, children: list[str]) -> str:
    """The top-level child of a features_only model holding `module_name` ("stages.0" is flattened
    to "stages_0" by timm's FeatureListNet, "layer1" stays)."""
    flat = module_name.replace(".", "_")
    return flat if flat in children else module_name.split(".")[0]


def _cached_file(timm, name: str) -> Path:
    """timm's pretrained file for `name` in the local Hugging Face cache (or, for weights timm
    still serves by URL, the torch hub cache). Never downloads."""
    cfg = timm.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    url = getattr(cfg, "url", None) if cfg is not None else None
    if hub_id:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str):
                return Path(found)
        where = f"the Hugging Face cache {HF_HUB_CACHE} (repository {hub_id}, model.safetensors)"
    elif url:
        cached = hub_checkpoint_dir() / Path(url).name
        if cached.is_file():
            return cached
        where = f"the torch hub cache as {cached}"
    else:
        raise FileNotFoundError(f"model.weights_backbone=cache: timm names no pretrained file for "
                                f"{name}; pass a local file: model.weights_backbone=/path/to/file")
    raise FileNotFoundError(
        f"model.weights_backbone=cache: timm's pretrained weights for {name} are not in {where}; "
        "nothing is downloaded at run time. On a machine with network run "
        f"`timm.create_model('{name}', pretrained=True)` and copy the cache here (or set HF_HOME), "
        f"or pass a local file: model.weights_backbone=/path/to/{name}.safetensors")
