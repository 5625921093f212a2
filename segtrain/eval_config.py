"""The run config of `segtrain eval`: the checkpoint's stored config with the command line's values
on top, checked by `segtrain.config_trust` before anything is built from it.

Torch-free: `segtrain.cli` rewrites eval's command line with `eval_overrides` before Hydra runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from segtrain.config_trust import read_stored_config, resolve_checked, trusted_names

# Keys of eval.yaml itself (and train's `trust`); every other override edits the checkpoint's config.
EVAL_KEYS = frozenset({"ckpt", "output", "use_ema", "save_predictions", "trust", "tta"})

# `a.b...=value`: a value deeper than a group choice, outside `hydra.`, without a +/++/~ prefix.
_NESTED_VALUE = re.compile(r"(?!hydra\.)[A-Za-z_][\w-]*(\.[\w-]+)+=")


def eval_overrides(args: Sequence[str]) -> list[str]:
    """Eval's command line as Hydra should compose it: `key.path=value` becomes `++key.path=value`.

    Eval composes eval.yaml, i.e. train's default groups (the U-Net, the synthetic dataset), but
    the keys a user sets belong to the checkpoint's config: `model.rpn_post_nms_top_n_test=50` of
    a Mask R-CNN run is not in the composed U-Net, and Hydra would refuse it ("not in struct")
    before the checkpoint is read. `merge_stored_config` then requires such a key to exist in the
    checkpoint's config, so a misspelt key is still an error.
    """
    return [f"++{arg}" if _NESTED_VALUE.match(arg) else arg for arg in args]


def merge_stored_config(stored: DictConfig, composed: DictConfig, overrides: Sequence[str],
                        own_keys: frozenset[str] = EVAL_KEYS) -> DictConfig:
    """The checkpoint's config with the values the command line set, copied unresolved from the
    composed config (so `${dataset.num_classes}`-style links keep working).

    overrides: the command line as Hydra received it (`HydraConfig.get().overrides.task`). A group
    choice (`dataset=voc`) replaces the whole node; `key.path=value` (or `++`) must name a key the
    checkpoint's config has at that point (a group chosen earlier on the line counts);
    `+key.path=value` adds one. The command's own keys (`own_keys`: eval's by default) and
    `hydra.` are not copied.
    """
    merged = stored.copy()
    raw = OmegaConf.to_container(composed, resolve=False)
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if override.is_delete() or key.split(".")[0] in own_keys or key.startswith("hydra"):
            continue
        if "." in key and not override.is_add():
            _require_stored_key(merged, key, override.input_line.removeprefix("++"))
        OmegaConf.update(merged, key, _raw_value(raw, key), merge=False, force_add=True)
    return merged


def _raw_value(container: dict, dotted: str) -> Any:
    node: Any = container
    for part in dotted.split("."):
        node = node[part]
    return node


def _require_stored_key(cfg: DictConfig, dotted: str, given: str) -> None:
    node: Any = OmegaConf.to_container(cfg, resolve=False)
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:depth]) or "the config"
            keys = f" ({where} has: {', '.join(map(str, node))})" if isinstance(node, dict) else ""
            raise ValueError(
                f"{given}: the checkpoint's config has no key {dotted}{keys}. Eval overrides "
                f"change keys of the stored config; to add a new one, write +{dotted}=..."
            )
        node = node[part]


def build_eval_config(stored_text: Any, composed: DictConfig, overrides: Sequence[str],
                      source: str, own_keys: frozenset[str] = EVAL_KEYS) -> DictConfig:
    """What `segtrain eval` builds from: the checkpoint's config (its "config" entry, YAML),
    resolvers checked, the command line's values merged in, resolved, every `_target_` checked
    against segtrain's shipped configs and the command line's `trust=` (composed.trust).
    own_keys: the command's own top-level keys, which are not the stored config's (eval's by
    default; `segtrain predict` passes its own).

    Raises ValueError naming the key and value of anything refused, before any of it runs.
    """
    trust = composed.get("trust")
    trusted_names(trust)  # a malformed trust= is reported before the stored config is read
    stored = read_stored_config(stored_text, source)
    return resolve_checked(merge_stored_config(stored, composed, overrides, own_keys), trust, source)
