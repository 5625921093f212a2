"""Type and range checks of a composed config before anything is built or written.

A wrong value (`trainer.max_iters=abc`, `optimizer.lr=-1`, `model.base_channels=8.5`) becomes one
message naming the key, the value and what was expected, instead of a TypeError from deep inside
a constructor. Keys of a `_target_` node are checked against the callable's own type hints, so a
new plug-in is checked without listing its keys here; the loop's keys against `TrainerConfig`.
"""

from __future__ import annotations

import collections.abc as cabc
import inspect
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigValueError(ValueError):
    """A config value of the wrong type or outside its range; the message names the key."""


# Groups whose `_target_` nodes (and nested ones) are checked against their callable's signature.
TARGET_GROUPS = ("dataset", "model", "loss", "optimizer", "scheduler", "task")
# Keys segtrain consumes itself before instantiating a node (train.build_optimizer).
CONSUMED_KEYS = {"optimizer": {"backbone_lr_mult", "norm_weight_decay", "bias_weight_decay"}}

# (key, check, what is expected): ranges that types alone do not say. Absent keys are skipped;
# the `trainer` group's are TrainerConfig's own (segtrain.engine.trainer_config.RANGES).
RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("seed", lambda v: _is_int(v), "an integer"),
    ("data.batch_size", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("data.val_batch_size", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("data.num_workers", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("data.pin_memory", lambda v: isinstance(v, bool) or v == "auto", "true, false or auto"),
    ("data.persistent_workers", lambda v: isinstance(v, bool), "true or false"),
    ("data.skip_corrupt", lambda v: isinstance(v, bool), "true or false"),
    ("optimizer.lr", lambda v: _is_number(v) and v > 0, "a number > 0"),
    ("optimizer.weight_decay", lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    ("optimizer.momentum", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optimizer.backbone_lr_mult", lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    ("optimizer.norm_weight_decay", lambda v: v is None or (_is_number(v) and v >= 0), "a number >= 0"),
    ("optimizer.bias_weight_decay", lambda v: v is None or (_is_number(v) and v >= 0), "null or >= 0"),
    ("scheduler.warmup_iters", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("scheduler.warmup_factor", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    ("dataset.num_classes", lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or null"),
    ("dataset.ignore_index", lambda v: _is_int(v), "an integer"),
]
# Counts that the model and the dataset (or task) must agree on.
CLASS_COUNT_KEYS = ("num_classes", "num_things", "num_stuff")


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigValueError for the first value of a wrong type or range in a train/eval config."""
    for key, ok, expected in RANGES:
        node = _select(cfg, key)
        if node is not _ABSENT and not ok(node):
            raise ConfigValueError(f"{key}={_show(node)}: expected {expected}")
    if cfg.get("resume") is not None:
        resume = _select(cfg, "resume")
        if not isinstance(resume, (bool, str)):
            raise ConfigValueError(f"resume={_show(resume)}: expected false, true, auto or a path to a .pt")
    if "trainer" in cfg:  # the loop's own checks: types from its fields, and its ranges
        from segtrain.engine.trainer_config import TrainerConfig

        TrainerConfig.from_dict(OmegaConf.to_container(cfg.trainer, resolve=True))
    for group in TARGET_GROUPS:
        if group in cfg and isinstance(cfg[group], DictConfig):
            _check_target_nodes(cfg[group], group, CONSUMED_KEYS.get(group, set()))
    check_class_counts(cfg)


def check_class_counts(cfg: DictConfig) -> None:
    """The model's class counts equal the dataset's (and the task's): a mismatch would fail deep
    inside the loss, or silently train a head of the wrong size."""
    for key in CLASS_COUNT_KEYS:
        want = _select(cfg, f"dataset.{key}")
        if not _is_int(want):
            continue
        for other in ("model", "task"):
            value = _select(cfg, f"{other}.{key}")
            if _is_int(value) and value != want:
                raise ConfigValueError(
                    f"{other}.{key}={value} but the dataset has {want} (dataset.{key}={want}); "
                    f"drop the {other}.{key} override ({other}.{key} follows dataset.{key}) or set "
                    f"dataset.{key} for both"
                )


def check_types(values: Mapping[str, Any], hints: Mapping[str, Any], prefix: str) -> None:
    """Each value in `values` conforms to its type hint in `hints` (keys without a hint pass)."""
    for key, value in values.items():
        if key in hints and not conforms(value, hints[key]):
            raise ConfigValueError(
                f"{prefix}.{key}={_show(value)}: expected {describe(hints[key])}")


def conforms(value: Any, hint: Any) -> bool:
    """Whether a plain config value (after `OmegaConf.to_container`) fits a type hint. Hints it
    cannot judge (classes, callables, unresolved names) accept anything: the constructor decides."""
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, (str, typing.ForwardRef)):
        return True
    if isinstance(value, Mapping) and "_target_" in value:
        return True  # a nested instantiation: its own keys are checked on their own
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    if hint in (Path, os.PathLike) or origin is os.PathLike:
        return isinstance(value, (str, os.PathLike))
    container = origin or hint
    if container in (list, tuple, set, cabc.Sequence, cabc.Iterable, cabc.Collection):
        if not isinstance(value, (list, tuple)):
            return False
        if container is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args))
        return not args or all(conforms(v, args[0]) for v in value)
    if container in (dict, cabc.Mapping, cabc.MutableMapping):
        return isinstance(value, Mapping)
    return True


def describe(hint: Any) -> str:
    """A type hint in words: 'an integer', 'a number or null', 'one of a, b'."""
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             type(None): "null", Path: "a path", os.PathLike: "a path"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if (origin or hint) in (list, tuple, cabc.Sequence):
        return "a list"
    if (origin or hint) in (dict, cabc.Mapping):
        return "a mapping"
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def _check_target_nodes(node: DictConfig, path: str, consumed: set[str]) -> None:
    """Check every `_target_` node under `node` against its callable's signature."""
    if "_target_" in node:
        _check_call(node, path, consumed)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _check_target_nodes(child, f"{path}.{key}", set())


def _check_call(node: DictConfig, path: str, consumed: set[str]) -> None:
    from hydra.utils import get_object

    target = node._target_
    try:
        fn = get_object(target)
    except Exception as err:  # noqa: BLE001 - any import failure is the same user error
        cause = err.__cause__ or err
        raise ConfigValueError(
            f"{path}._target_={target}: cannot import it ({type(cause).__name__}: {cause}); "
            "check the name, and that its package is installed") from None
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: the constructor checks
    params = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    keys = [k for k in node if not str(k).startswith("_") and k not in consumed]
    unknown = [k for k in keys if k not in params]
    if unknown and not takes_any:
        accepted = ", ".join(p for p in params if p not in ("self", "args", "kwargs"))
        raise ConfigValueError(
            f"{path}.{unknown[0]}: {target} takes no parameter '{unknown[0]}'; it takes: {accepted}")
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: check nothing rather than guess
        return
    values = {k: _resolved_value(node, k) for k in keys if k in params}
    # A class count left null is filled from the data once the dataset is built (train.py).
    values = {k: v for k, v in values.items() if not (k in CLASS_COUNT_KEYS and v is None)}
    check_types(values, hints, path)


_ABSENT = object()


def _select(cfg: DictConfig, key: str) -> Any:
    """The resolved value at a dotted key as plain Python, or _ABSENT."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node:
        return _ABSENT
    return _resolved_value(node, leaf)


def _resolved_value(node: DictConfig, key: str) -> Any:
    if OmegaConf.is_missing(node, key):
        return _ABSENT
    value = node[key]  # resolves interpolations; their errors name the key themselves
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)
