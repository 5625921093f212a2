"""What a config stored in a checkpoint may make Hydra run: nothing but the callables segtrain's
shipped configs name, plus those the user trusts on the command line.

A checkpoint is data from anywhere. Its config is read in three steps, each before the next runs
anything: (1) every `${...}` in its raw text, escaped and nested ones included, must be a plain
interpolation (`${dataset.num_classes}`) or call a resolver on `STORED_CONFIG_RESOLVERS`: other
resolvers run code at resolution, and `oc.create` / `oc.decode` turn strings into nodes, i.e.
into `_target_`s that exist only after resolution; (2) the config is fully resolved, and no
string of the result may still hold `${` (Hydra's `instantiate` resolves again, which turns an
escaped `\\${...}` into a live one); (3) every `_target_` of the resolved config, at any depth,
must be exactly a name on the allow-list: the `_target_`s of segtrain's shipped `conf/` (read
from the installed package, so it cannot drift), or a name or module prefix (`mypkg.*`) that
the user passed as `trust=[...]` on this command line. Callers then build from the resolved
config this module returns, never from the stored text again.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from importlib import resources
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from segtrain.config_upgrade import upgrade_targets

# Resolvers a stored config may call. Each is pure selection over the config itself; the test
# suite checks that every resolver in the shipped job configs is here. Deliberately absent:
# oc.create / oc.decode (build nodes from strings: `_target_`s that appear only after
# resolution), oc.env (reads the environment into attacker-chosen places), now / hydra
# (the Hydra run's values, never needed by a stored job config), any custom resolver.
STORED_CONFIG_RESOLVERS = frozenset({"oc.select"})

# After `${`: optional spaces, a key path or resolver name, optional spaces, then `}` or `:`.
# Anything else (a nested `${` in a name, quotes, a brace) is refused rather than interpreted.
_INTERPOLATION = re.compile(r"\s*([A-Za-z0-9_.\-\[\]]*)\s*([}:])?")
_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_SHOWN_CHARS = 200  # a refused value is quoted up to this length in the error


@functools.cache
def shipped_targets() -> frozenset[str]:
    """Every `_target_` that segtrain's shipped configs can place in a job config.

    Read from the YAML files of the installed `segtrain.conf` package. Targets that land under
    `hydra.` (launchers, sweepers, callbacks: Hydra builds those from its own config, never from
    a job config or a checkpoint) are left out.
    """
    targets: set[str] = set()
    for group, item in _yaml_files(resources.files("segtrain.conf"), ()):
        text = item.read_text(encoding="utf-8")
        package = _package_of(text, group)
        for path, target in _targets_in(yaml.safe_load(text), package):
            if path[0] != "hydra" and isinstance(target, str):
                targets.add(target)
    return frozenset(targets)


def _yaml_files(folder: Any, group: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(group path, file) for each YAML file under an importlib.resources folder."""
    for item in sorted(folder.iterdir(), key=lambda entry: entry.name):
        if item.is_dir() and not item.name.startswith(("_", ".")):
            yield from _yaml_files(item, (*group, item.name))
        elif item.name.endswith(".yaml"):
            yield group, item


def _package_of(text: str, group: tuple[str, ...]) -> tuple[str, ...]:
    """Where Hydra places a config file's keys: its `# @package` header, else its group path."""
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header = line.lstrip("# ")
        if header.startswith("@package"):
            first, *rest = header.removeprefix("@package").strip().split(".")
            if first == "_global_":
                return tuple(rest)
            return (*group, *rest) if first == "_group_" else (first, *rest)
    return group


def _targets_in(node: Any, where: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                yield (*where, "_target_"), value
            else:
                yield from _targets_in(value, (*where, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets_in(value, (*where, f"[{i}]"))


def trusted_names(trust: Any) -> tuple[frozenset[str], tuple[str, ...]]:
    """The command line's `trust=` as (exact names, module prefixes ending in '.').

    trust: null, one string, or a list of strings, each a dotted name (`mypkg.MyNet`) or a
    module prefix (`mypkg.*`, `mypkg.models.*`).
    """
    if trust is None:
        return frozenset(), ()
    if isinstance(trust, str):
        entries = [trust]
    elif isinstance(trust, (list, tuple, ListConfig)):
        entries = list(trust)
    else:
        raise ValueError(f"trust={trust!r}; expected a list of dotted names or module prefixes, "
                         "e.g. trust=[mypkg.MyNet,mypkg.layers.*]")
    names, prefixes = set(), []
    for entry in entries:
        text = entry if isinstance(entry, str) else ""
        name = text[:-2] if text.endswith(".*") else text
        if not _DOTTED_NAME.fullmatch(name):
            raise ValueError(
                f"trust entry {entry!r} is not a dotted name (mypkg.MyNet) or a module prefix "
                "(mypkg.*); e.g. trust=[mypkg.MyNet,mypkg.layers.*]"
            )
        if text.endswith(".*"):
            prefixes.append(name + ".")
        else:
            names.add(name)
    return frozenset(names), tuple(prefixes)


def is_allowed_target(target: Any, trust: Any = None) -> bool:
    """Whether a stored config may name `target`: exactly a shipped target or a trusted name, or
    a well-formed dotted name under a trusted module prefix."""
    if not isinstance(target, str):
        return False
    names, prefixes = trusted_names(trust)
    if target in shipped_targets() or target in names:
        return True
    return bool(_DOTTED_NAME.fullmatch(target)) and target.startswith(prefixes)


def check_resolvers(raw: Any, source: str) -> None:
    """Refuse a raw (unresolved) config whose text calls a resolver not on the allow-list.

    raw: a plain container (parsed YAML). Every `${` in every string, keys included, is
    examined, whether OmegaConf would read it as escaped, nested or quoted: what is escaped now
    is live after Hydra's second resolution.
    """
    refused = []
    for path, text in _strings(raw, ""):
        for problem in _interpolation_problems(text):
            refused.append(f"{path or '<root>'}: {_shown(text)} ({problem})")
    if refused:
        allowed = ", ".join(sorted(STORED_CONFIG_RESOLVERS))
        raise ValueError(
            f"{source}: its config calls interpolation resolvers that a stored config may not use, "
            f"at {'; '.join(refused)}. A checkpoint's config may only hold plain interpolations "
            f"(${{dataset.num_classes}}) and the resolvers {allowed}: refusing to resolve it"
        )


def _interpolation_problems(text: str) -> Iterator[str]:
    start = text.find("${")
    while start >= 0:
        match = _INTERPOLATION.match(text, start + 2)
        name, end = match.group(1), match.group(2)
        if end == ":" and name not in STORED_CONFIG_RESOLVERS:
            yield f"resolver {name!r}"
        elif end is None:
            yield "an interpolation that is not a plain key path"
        start = text.find("${", start + 2)


def _strings(node: Any, where: str) -> Iterator[tuple[str, str]]:
    """(key path, string) for every string in a plain container, keys as well as values."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if isinstance(key, str):
                yield path, key
            yield from _strings(value, path)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where, node


def check_targets(resolved: Any, trust: Any, source: str) -> None:
    """Refuse a resolved config (plain container) holding a string with `${`, which a second
    resolution would interpret, or a `_target_` that is not allowed (see the module doc)."""
    reinterpreted = [f"{path or '<root>'}: {_shown(text)}" for path, text in _strings(resolved, "")
                     if "${" in text]
    if reinterpreted:
        raise ValueError(
            f"{source}: its config resolves to text that would be resolved again, at "
            f"{'; '.join(reinterpreted)}; a stored config may not hold escaped interpolations: "
            "refusing to use it"
        )
    refused = [(".".join(path).replace(".[", "["), target)
               for path, target in _targets_in(resolved, ()) if not is_allowed_target(target, trust)]
    if not refused:
        return
    names = [t for _, t in refused if isinstance(t, str) and _DOTTED_NAME.fullmatch(t)]
    fix = (f"trust=[{','.join(dict.fromkeys(names))}] (or a module prefix, e.g. trust=[mypkg.*])"
           if names else "trust=[mypkg.MyNet] or trust=[mypkg.*] (a _target_ must be a dotted name)")
    raise ValueError(
        f"{source}: its config names code that segtrain's own configs do not, at "
        f"{'; '.join(f'{path}={_shown(target)}' for path, target in refused)}; refusing to run "
        "code from a checkpoint. If it is your own run of your own code, trust that code on this "
        f"command line: {fix}. Trust is never stored in a checkpoint: pass it on each command."
    )


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}... ({len(text)} chars)"


def read_stored_config(text: Any, source: str) -> DictConfig:
    """A checkpoint's "config" entry (the run's job config as unresolved YAML) as a DictConfig,
    after refusing any resolver call in it (`check_resolvers`, on the plain YAML data, before
    OmegaConf parses a single interpolation). Nothing is resolved yet: resolve and check it with
    `resolve_checked` before building anything from it."""
    if not isinstance(text, str):
        raise ValueError(f"{source}: its 'config' entry is a {type(text).__name__}; expected the "
                         "run's config as YAML text")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: its config is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: its config is a {type(raw).__name__}; expected a mapping")
    check_resolvers(raw, source)
    raw = upgrade_targets(raw)  # names of modules that moved since the checkpoint was written
    try:  # from the data just checked, not the text again: one parse, nothing unseen
        return OmegaConf.create(raw)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ValueError(f"{source}: its config cannot be read at {getattr(err, 'full_key', None)}: "
                         f"{str(err).splitlines()[0]}; refusing to use it") from err


def resolve_checked(cfg: DictConfig, trust: Any, source: str) -> DictConfig:
    """`cfg` fully resolved, its `_target_`s checked (`check_targets`): a config without
    interpolations, so what Hydra builds from it is exactly what was checked.

    cfg: a config from `read_stored_config`, possibly with the command line's values merged in.
    trust: the command line's `trust=` (never the stored config's own).
    """
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ValueError(f"{source}: its config does not resolve at {getattr(err, 'full_key', None)}: "
                         f"{str(err).splitlines()[0]}") from err
    check_targets(resolved, trust, source)
    return OmegaConf.create(resolved)


def check_stored_config(text: Any, trust: Any, source: str) -> DictConfig:
    """`read_stored_config` then `resolve_checked`: a checkpoint's config, safe to build from."""
    return resolve_checked(read_stored_config(text, source), trust, source)
