"""Offline weight loading: local state-dict files, or torchvision weights in the torch hub cache."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

log = logging.getLogger(__name__)

# "ResNet50_Weights.IMAGENET1K_V1", "DeepLabV3_ResNet50_Weights.DEFAULT", ...
_TORCHVISION_NAME = re.compile(r"^[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+$")
_SHOWN = 5  # keys named in an error message before "... and N more"


def hub_checkpoint_dir() -> Path:
    """Where torchvision would cache downloaded weights: `torch.hub.get_dir()/checkpoints`."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _torchvision_weights(spec: str):
    """The torchvision `Weights` entry named by `spec`; ValueError if torchvision has none."""
    from torchvision.models import get_weight

    try:
        return get_weight(spec)
    except (ValueError, KeyError) as err:
        enum_name = spec.split(".")[0]
        try:  # every torchvision weights enum has a DEFAULT alias: use it to list the entries
            enum = type(get_weight(f"{enum_name}.DEFAULT"))
            entries = [f"{enum_name}.{entry.name}" for entry in enum]
            hint = f"; {enum_name} has: {', '.join(entries)}"
        except (ValueError, KeyError):
            hint = f"; torchvision has no {enum_name} (see torchvision.models.list_models())"
        raise ValueError(f"unknown torchvision weights {spec!r}{hint}") from err


def resolve_weights(spec: str, option: str = "model.weights") -> Path:
    """The local file for `spec`: a path to a `.pth`/`.pt`/`.safetensors` file, or a torchvision weights name
    (e.g. "ResNet50_Weights.IMAGENET1K_V1") looked up in the torch hub cache. Never downloads.

    `option` is the config key the spec came from, used in error messages only.
    Raises FileNotFoundError (naming the expected path and the URL) or ValueError.
    """
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise ValueError(f"{option}={spec!r}; expected a file path or a torchvision weights name")
    text = str(spec).strip()
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if not _TORCHVISION_NAME.match(text):
        raise FileNotFoundError(
            f"{option}={text!r}: no such file {path.resolve()}; expected a local .pth/.pt "
            "state dict or a torchvision weights name such as 'ResNet50_Weights.IMAGENET1K_V1'"
        )
    url = _torchvision_weights(text).url
    cached = hub_checkpoint_dir() / Path(urlparse(url).path).name
    if not cached.is_file():
        raise FileNotFoundError(
            f"{option}={text}: the weights are not in the local torch hub cache (nothing is "
            f"downloaded at run time). Expected file: {cached}. On a machine with network, "
            f"fetch {url} and copy it to that path (or point TORCH_HOME at a cache holding it), "
            f"or pass a local file instead, e.g. {option}=/path/to/file.pth"
        )
    return cached


def load_state_dict_from_spec(spec: str, option: str = "model.weights") -> dict[str, torch.Tensor]:
    """Load the state dict named by `spec` (see `resolve_weights`) onto the CPU.

    The file may hold a state dict or a dict with one under "model" (segtrain checkpoints) or
    "state_dict"; a "module." prefix left by DistributedDataParallel is stripped.
    """
    path = resolve_weights(spec, option)
    if path.suffix == ".safetensors":  # timm's and Hugging Face's format: tensors only, no pickle
        return _load_safetensors(path, option)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for non-torch or unsafe pickles
        raise ValueError(
            f"{option}: cannot read {path} as a torch state dict with weights_only=True: {err}"
        ) from err
    state_dict = _unwrap(obj, path, option)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _load_safetensors(path: Path, option: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise ValueError(f"{option}: {path} is a .safetensors file; reading it needs the safetensors "
                         "package (pip install 'segtrain[timm]')") from err
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{option}: cannot read {path} as a safetensors file: {err}") from err


def _unwrap(obj: object, path: Path, option: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("model", "state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and all(isinstance(v, torch.Tensor)
                                                  for v in inner.values()):
                return inner
        found = ", ".join(map(repr, list(obj)[:8]))
        raise ValueError(
            f"{option}: {path} holds a dict with keys {found}, not a state dict; expected "
            "tensors keyed by parameter name, or such a dict under 'model' or 'state_dict'"
        )
    raise ValueError(f"{option}: {path} holds a {type(obj).__name__}; expected a state dict")


@dataclass
class LoadReport:
    """What `load_matching` did with each key of the module's state dict."""

    loaded: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _starts(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(prefix) for prefix in prefixes)


def _listing(items: list[str]) -> str:
    more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return "; ".join(items[:_SHOWN]) + more


def load_matching(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    reinit_prefixes: Iterable[str] = (),
    ignore_prefixes: Iterable[str] = (),
    source: str = "state dict",
) -> LoadReport:
    """Copy `state_dict` into `module`, every key and shape matching, with two escape hatches.

    A module key under `reinit_prefixes` whose shape differs, or which the file lacks, keeps the
    module's fresh initialisation (e.g. a classifier for another class count). A file key under
    `ignore_prefixes` that the module lacks is dropped (e.g. an ImageNet `fc.` layer). Any other
    difference raises ValueError naming the first keys and shapes; BatchNorm's
    `num_batches_tracked` may be absent from old files. Re-initialised keys are logged.
    """
    reinit_prefixes, ignore_prefixes = tuple(reinit_prefixes), tuple(ignore_prefixes)
    own = module.state_dict()
    report = LoadReport()
    missing, unexpected, mismatched = [], [], []
    merged = dict(own)
    for key, value in own.items():
        if key in state_dict and state_dict[key].shape == value.shape:
            merged[key] = state_dict[key]
            report.loaded.append(key)
        elif _starts(key, reinit_prefixes):
            report.reinitialized.append(key)
        elif key not in state_dict:
            if not key.endswith("num_batches_tracked"):
                missing.append(key)
        else:
            mismatched.append(f"{key}: file {tuple(state_dict[key].shape)} vs model "
                              f"{tuple(value.shape)}")
    for key in state_dict:
        if key not in own:
            (report.ignored if _starts(key, ignore_prefixes) else unexpected).append(key)
    if missing or unexpected or mismatched:
        problems = [f"{label} ({len(keys)}): {_listing(keys)}" for label, keys in (
            ("shape mismatches", mismatched), ("missing from the file", missing),
            ("not in the model", unexpected)) if keys]
        raise ValueError(
            f"weights {source} do not fit {type(module).__name__} (a state dict for another "
            f"architecture or configuration?): {' | '.join(problems)}"
        )
    module.load_state_dict(merged, strict=True)
    if report.reinitialized:
        log.info("weights %s: re-initialised %d keys whose shape differs or that the file lacks: "
                 "%s", source, len(report.reinitialized), ", ".join(report.reinitialized))
    if report.ignored:
        log.info("weights %s: ignored %d file keys the model does not use (%s)", source,
                 len(report.ignored), _listing(report.ignored))
    return report
