"""Optimizer parameter groups: a backbone learning-rate multiplier and no decay on norms/biases."""

from __future__ import annotations

from torch import nn

# Layers whose parameters are scales and shifts of normalised activations: decaying them toward
# zero fights the normalisation, so they get `norm_weight_decay` (0 by default).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


# Parameters that are tables of positions rather than weights (Swin's relative position bias,
# ViT-style absolute embeddings and class tokens): decaying them erases what they encode, so
# they are treated as norms (Swin's and MMSegmentation's recipes set their decay to 0).
# nn.Embedding tables (Mask2Former's queries and decoder level embeddings) likewise, as its
# recipes do (WEIGHT_DECAY_EMBED 0).
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "pos_embed", "cls_token",
                  "position_embedding", "logit_scale")
NO_DECAY_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding,)


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    norm_weight_decay: float = 0.0,
    bias_weight_decay: float | None = None,
    backbone_lr_mult: float = 1.0,
    backbone_prefix: str = "backbone.",
) -> list[dict]:
    """Split the trainable parameters of `model` into optimizer groups.

    A parameter whose qualified name starts with `backbone_prefix` gets `lr * backbone_lr_mult`,
    any other `lr`. Parameters of normalisation layers and position tables (NO_DECAY_NAMES) get
    `norm_weight_decay`, other biases
    `bias_weight_decay` (None = `norm_weight_decay`), everything else `weight_decay`. Frozen
    parameters are left out, as are empty groups; a shared parameter goes in one group only.
    Each group is `{"name": "<backbone|head>.<decay|norm|bias>", "params", "lr",
    "weight_decay"}`, ready for any `torch.optim` optimizer.
    """
    for key, value in {"lr": lr, "weight_decay": weight_decay, "norm_weight_decay":
                       norm_weight_decay, "backbone_lr_mult": backbone_lr_mult}.items():
        if value < 0:
            raise ValueError(f"build_param_groups: {key}={value}; expected >= 0")
    if bias_weight_decay is None:
        bias_weight_decay = norm_weight_decay
    decays = {"decay": weight_decay, "norm": norm_weight_decay, "bias": bias_weight_decay}
    lrs = {"backbone": lr * backbone_lr_mult, "head": lr}

    groups: dict[tuple[str, str], list[nn.Parameter]] = {
        (part, kind): [] for part in lrs for kind in decays
    }
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            part = "backbone" if name.startswith(backbone_prefix) else "head"
            if isinstance(module, NORM_TYPES + NO_DECAY_TYPES) or param_name in NO_DECAY_NAMES:
                kind = "norm"
            elif param_name == "bias":
                kind = "bias"
            else:
                kind = "decay"
            groups[part, kind].append(param)

    return [
        {"name": f"{part}.{kind}", "params": params, "lr": lrs[part],
         "weight_decay": decays[kind]}
        for (part, kind), params in groups.items()
        if params
    ]
