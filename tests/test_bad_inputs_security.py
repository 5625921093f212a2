"""A checkpoint is data: its config may only instantiate the callables of segtrain's own configs
(plus what the user trusts on the command line), checked on the fully resolved config. Crafted
configs through eval's config building, resume's check and the real CLI; eval's overrides of
the stored config; AR on eval's console."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, run_cli
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from segtrain.config_trust import (
    STORED_CONFIG_RESOLVERS,
    check_stored_config,
    is_allowed_target,
    shipped_targets,
    trusted_names,
)
from segtrain.eval_config import build_eval_config, eval_overrides
from segtrain.metrics.report import report
from segtrain.utils.checkpoint import load_checkpoint, save_checkpoint

SOURCE = "checkpoint crafted.pt"


def _compose(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="segtrain.conf", version_base="1.3"):
        return compose(name, overrides=overrides)


def _as_train_stores(cfg) -> str:
    """The "config" entry `segtrain train` writes: the job config as unresolved YAML, without the
    command line's trust list."""
    with open_dict(cfg):
        del cfg["trust"]
    return OmegaConf.to_yaml(cfg)


@pytest.fixture(scope="module")
def stored_config() -> dict:
    """What `segtrain train` stores (`OmegaConf.to_yaml(cfg)`, unresolved) for a tiny run."""
    return yaml.safe_load(_as_train_stores(_compose("train", TINY)))


@pytest.fixture(scope="module")
def eval_cfg():
    return _compose("eval", ["ckpt=crafted.pt"])


def _yaml(config: dict) -> str:
    """A crafted config as an attacker writes it: plain YAML text."""
    return yaml.safe_dump(config, allow_unicode=True, sort_keys=False)


def _eval_config(text: str, eval_cfg, overrides=("ckpt=crafted.pt",)):
    """The real eval code path that decides what gets built from a checkpoint."""
    return build_eval_config(text, eval_cfg, list(overrides), SOURCE)


def _place(config: dict, path: str, node) -> dict:
    """A deep copy of `config` with `node` at dotted `path` (`a.b[1].c`; lists are extended)."""
    config = json.loads(json.dumps(config))
    parts = path.replace("[", ".[").split(".")
    parent = config
    for part, following in zip(parts, parts[1:]):
        key = int(part[1:-1]) if part.startswith("[") else part
        if isinstance(parent, dict) and key not in parent:
            parent[key] = [] if following.startswith("[") else {}
        if isinstance(parent, list):
            while len(parent) <= key:
                parent.append({})
        parent = parent[key]
    last = parts[-1]
    if last.startswith("["):
        while len(parent) <= int(last[1:-1]):
            parent.append(None)
        parent[int(last[1:-1])] = node
    else:
        parent[last] = node
    return config


# --- Payloads: nodes that, instantiated by Hydra, run foreign code (most create `marker`). ------

def target_payloads(marker: str) -> dict[str, dict]:
    """Callables outside segtrain's configs, from the modules an attacker would reach for."""
    script = f"open({marker!r}, 'w').close()"
    opener = {"_target_": "builtins.open", "_args_": [marker, "w"]}
    return {
        "torch_fx_exec": {"_target_": "torch.fx.graph_module._exec_with_source", "src": script,
                          "globals": {}, "_convert_": "all"},
        "torch_save": {"_target_": "torch.save", "_args_": [1, marker]},
        "torchvision_save_image": {"_target_": "torchvision.utils.save_image", "fp": marker,
                                   "tensor": {"_target_": "torch.zeros", "_args_": [3, 2, 2]}},
        "segtrain_function_not_in_conf": {"_target_": "segtrain.metrics.report.write_metrics_json",
                                          "_args_": [{"a": 1}, marker]},
        "segtrain_save_checkpoint": {"_target_": "segtrain.utils.checkpoint.save_checkpoint",
                                     "_args_": [{}, marker]},
        "builtins_open": opener,
        "builtins_exec": {"_target_": "builtins.exec", "_args_": [script]},
        "os_system": {"_target_": "os.system", "_args_": [f"touch '{marker}'"]},
        "subprocess_run": {"_target_": "subprocess.run", "_args_": [["touch", marker]], "_convert_": "all"},
        "shutil_copyfile": {"_target_": "shutil.copyfile", "src": str(ROOT / "setup.cfg"), "dst": marker},
        "pathlib_write_text": {"_target_": "pathlib.Path.write_text",
                               "_args_": [{"_target_": "pathlib.Path", "_args_": [marker]}, "x"]},
        "hydra_instantiate": {"_target_": "hydra.utils.instantiate", "_recursive_": False, "config": opener},
        "hydra_call": {"_target_": "hydra.utils.call", "_recursive_": False, "config": opener},
        "omegaconf_save": {"_target_": "omegaconf.OmegaConf.save", "_args_": [{"a": 1}, marker]},
        # These two create no file (importing and looking up are the first steps of an attack).
        "importlib_import_module": {"_target_": "importlib.import_module", "name": "os"},
        "hydra_get_method": {"_target_": "hydra.utils.get_method", "path": "os.system"},
    }


MARKERLESS = {"importlib_import_module", "hydra_get_method"}

# Where a payload node goes in the stored config.
PLACES = [
    "model", "dataset.val", "dataset.train.transforms", "loss", "task", "scheduler",
    "model.extra.deeper.deepest", "model._args_[0]", "loss.terms[1]", "data.anything",
    "trainer.device", "hydra.callbacks.evil", "evil", "model.defaults[0]",
]


def _marker(tmp_path: Path) -> str:
    return str(tmp_path / "marker.png")  # .png: torchvision's save_image picks the format by it


@pytest.mark.parametrize("name", sorted(target_payloads("m")))
def test_each_payload_is_live_when_instantiated_without_the_check(name, tmp_path):
    """The variants below are real attacks: Hydra alone runs each of them, unless the installed
    Hydra's own best-effort blocklist (newer 1.3 releases) names it; segtrain relies on none."""
    marker = _marker(tmp_path)
    try:
        instantiate(OmegaConf.create(target_payloads(marker)[name]))
    except InstantiationException as err:
        assert "blocklisted" in str(err)
        return
    assert Path(marker).exists() or name in MARKERLESS


@pytest.mark.parametrize("place", [*PLACES, "optimizer+_partial_"])
@pytest.mark.parametrize("name", sorted(target_payloads("m")))
def test_a_foreign_target_anywhere_is_refused_naming_key_and_value(name, place, stored_config,
                                                                   eval_cfg, tmp_path):
    marker = _marker(tmp_path)
    payload = target_payloads(marker)[name]
    if place == "optimizer+_partial_":
        place, payload = "optimizer", {**payload, "_partial_": True}
    text = _yaml(_place(stored_config, place, payload))
    for check in (lambda: _eval_config(text, eval_cfg), lambda: check_stored_config(text, None, SOURCE)):
        with pytest.raises(ValueError, match="refusing") as refused:
            check()
        assert f"{place}._target_={payload['_target_']!r}" in str(refused.value)
        assert "trust=[" in str(refused.value)
    assert not Path(marker).exists()


# --- Resolvers: a stored config's `${name:...}` runs code when resolved, or builds nodes. -------

def resolver_variants(marker: str):
    """(id, value string, extra top-level keys) that resolve into foreign code or foreign values."""
    flow = f"{{_target_: builtins.open, _args_: [{marker}, w]}}"
    yield "oc_create", f"${{oc.create:{flow}}}", {}
    yield "oc_decode", f"${{oc.decode:'{flow}'}}", {}
    yield "nested_in_allowed_resolver", f"${{oc.select:nowhere,${{oc.create:{flow}}}}}", {}
    yield "escaped", f"\\${{oc.create:{flow}}}", {}
    yield "escaped_in_text", f"prefix \\${{oc.create:{flow}}} suffix", {}
    yield "spaces_around_name", f"${{ oc.create : {flow}}}", {}
    yield "name_from_interpolation", f"${{oc.${{suffix}}:{flow}}}", {"suffix": "create"}
    yield "custom_resolver", f"${{segtrain_test_touch:{marker}}}", {}
    yield "lookalike_name", f"${{\u03bfc.create:{flow}}}", {}  # Greek omicron
    yield "oc_env", "${oc.env:HOME}", {}
    yield "now", "${now:%Y}", {}
    yield "hydra", "${hydra:runtime.cwd}", {}
    yield "oc_dict_values", "${oc.dict.values:model}", {}


RESOLVER_PLACES = ["model", "model.weights", "dataset.val", "loss", "optimizer", "task",
                   "trainer.device", "data.batch_size", "model._args_[1]", "hydra.callbacks.evil"]


@pytest.fixture
def touch_resolver(tmp_path):
    """A registered resolver that creates its argument: resolving it is running code."""
    OmegaConf.register_new_resolver("segtrain_test_touch", lambda path: Path(path).touch() or 1)
    yield
    OmegaConf.clear_resolver("segtrain_test_touch")


@pytest.mark.parametrize("place", RESOLVER_PLACES)
@pytest.mark.parametrize("variant", [v[0] for v in resolver_variants("m")])
def test_a_resolver_call_anywhere_is_refused_before_anything_resolves(variant, place, stored_config,
                                                                      eval_cfg, tmp_path, touch_resolver):
    marker = _marker(tmp_path)
    _, value, extra = next(v for v in resolver_variants(marker) if v[0] == variant)
    text = _yaml({**_place(stored_config, place, value), **extra})
    for check in (lambda: _eval_config(text, eval_cfg), lambda: check_stored_config(text, None, SOURCE)):
        with pytest.raises(ValueError, match="refusing") as refused:
            check()
        assert f"{place}: {value!r}"[:120] in str(refused.value)
    assert not Path(marker).exists()


def test_a_resolver_hidden_in_a_key_is_refused(stored_config, eval_cfg, tmp_path):
    key = f"${{oc.create:{{_target_: builtins.open, _args_: [{_marker(tmp_path)}, w]}}}}"
    text = _yaml(_place(stored_config, "model", {key: 1}))
    with pytest.raises(ValueError, match="resolver 'oc.create'"):
        _eval_config(text, eval_cfg)


def test_every_resolver_of_the_shipped_job_configs_is_allowed():
    """Checkpoints of shipped configs must keep loading: their resolvers are on the list."""
    used = set()
    for path in (ROOT / "conf").rglob("*.yaml"):
        if "hydra" in path.relative_to(ROOT / "conf").parts:
            continue
        data = yaml.safe_load(path.read_text()) or {}
        data.pop("hydra", None)
        used |= {name for name in _resolver_names(json.dumps(data))}
    assert used and used <= STORED_CONFIG_RESOLVERS


def _resolver_names(text: str) -> set[str]:
    return set(re.findall(r"\$\{\s*([\w.\-]+)\s*:", text))


# --- The exact final string: lookalikes of allowed names, other types, indirections. ----------

UNET = "segtrain.models.unet.UNet"
NOT_EXACTLY = [
    f" {UNET}", f"{UNET} ", f"{UNET}\n", "segtrain.models..unet.UNet", f".{UNET}",
    "segtrain.models.unet.U\u039det",  # Greek capital Nu
    f"{UNET}.__init__", f"{UNET}.__class__", "segtrain.models.unet", "segtrain.models.unet:UNet",
    "segtrain.models.unet.UNet.__init__.__globals__", 1, True, None, [UNET], {"_target_": "builtins.open"},
]


@pytest.mark.parametrize("target", NOT_EXACTLY, ids=repr)
def test_only_the_exact_name_of_a_shipped_target_passes(target, stored_config, eval_cfg):
    text = _yaml(_place(stored_config, "model._target_", target))
    with pytest.raises(ValueError, match="refusing") as refused:
        _eval_config(text, eval_cfg)
    assert "model._target_=" in str(refused.value)


def test_a_target_reached_through_interpolation_is_checked_resolved(stored_config, eval_cfg):
    config = _place(stored_config, "model._target_", "${names.evil}")
    config["names"] = {"evil": "builtins.exec"}
    with pytest.raises(ValueError, match=r"model\._target_='builtins\.exec'"):
        _eval_config(_yaml(config), eval_cfg)
    config = _place(stored_config, "model", "${gadget}")
    config["gadget"] = {"_target_": "os.system", "_args_": ["true"]}
    with pytest.raises(ValueError, match=r"model\._target_='os\.system'") as refused:
        _eval_config(_yaml(config), eval_cfg)
    assert "gadget._target_='os.system'" in str(refused.value)


def test_a_node_built_by_the_allowed_resolver_is_checked_after_resolution(stored_config, eval_cfg,
                                                                         tmp_path):
    """oc.select's default is parsed into a node: a `_target_` exists only after resolution."""
    marker = _marker(tmp_path)
    value = f"${{oc.select:nowhere,{{_target_: builtins.open, _args_: [{marker}, w]}}}}"
    text = _yaml(_place(stored_config, "loss.terms[0]", value))
    for check in (lambda: _eval_config(text, eval_cfg), lambda: check_stored_config(text, None, SOURCE)):
        with pytest.raises(ValueError, match=r"loss\.terms\[0\]\._target_='builtins\.open'"):
            check()
    assert not Path(marker).exists()


def test_a_trust_list_stored_in_the_checkpoint_is_ignored(stored_config, eval_cfg):
    config = _place(stored_config, "model", {"_target_": "os.system", "_args_": ["true"]})
    config["trust"] = ["os.*", "os.system"]
    with pytest.raises(ValueError, match=r"model\._target_='os\.system'"):
        _eval_config(_yaml(config), eval_cfg)


def test_hydra_callback_targets_are_not_allowed_in_a_stored_config():
    """Hydra builds launchers, sweepers and callbacks from its own config, never a job's."""
    assert "segtrain.sweep.SweepSummary" not in shipped_targets()
    assert not is_allowed_target("segtrain.sweep.SweepSummary")


@pytest.mark.parametrize("path", sorted((ROOT / "conf" / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_allow_list_holds_every_shipped_model(path):
    assert yaml.safe_load(path.read_text())["_target_"] in shipped_targets()


def _config_choices():
    """One override per shipped group option (and experiment), the folder enumerated."""
    for group in ("model", "experiment", "dataset", "loss", "optimizer", "scheduler"):
        yield from (f"{group}={p.stem}" for p in sorted((ROOT / "conf" / group).glob("*.yaml")))


@pytest.mark.parametrize("choice", list(_config_choices()))
def test_what_train_stores_for_any_shipped_config_evaluates_without_trust(choice, eval_cfg):
    cfg = _compose("train", [choice, "dataset.root=/data", "dataset.num_classes=5"])
    run_cfg = _eval_config(_as_train_stores(cfg), eval_cfg)
    assert run_cfg.model._target_ == cfg.model._target_
    assert "${" not in OmegaConf.to_yaml(run_cfg)  # resolved: nothing left for Hydra to interpret


def test_eval_overrides_are_merged_and_resolved(stored_config):
    overrides = ["ckpt=crafted.pt", "dataset.num_classes=3", "dataset.val.num_samples=2"]
    eval_cfg = _compose("eval", eval_overrides(overrides))
    run_cfg = _eval_config(yaml.safe_dump(stored_config), eval_cfg, eval_overrides(overrides))
    assert (run_cfg.model.num_classes, run_cfg.dataset.val.num_samples) == (3, 2)


# --- trust=: the user's explicit decision, on the command line only. --------------------------

@pytest.mark.parametrize("trust, target, allowed", [
    (["mypkg.MyNet"], "mypkg.MyNet", True),
    (["mypkg.MyNet"], "mypkg.MyNetX", False),
    (["mypkg.*"], "mypkg.models.MyNet", True),
    (["mypkg.*"], "mypkgx.MyNet", False),
    (["mypkg.*"], "mypkg", False),
    (["mypkg.*"], "mypkg..MyNet", False),
    (["mypkg.*"], "mypkg.MyNet ", False),
    ("mypkg.MyNet", "mypkg.MyNet", True),
    (None, "segtrain.models.unet.build_unet", True),
    (None, UNET, False),  # conf/ now names the builder; old checkpoints are upgraded to it
    ([], "torch.optim.SGD", True),
    ([], "torch.optim.Adam", False),  # torch.* is not a prefix: only what conf/ names
])
def test_trust_names_exact_callables_or_module_prefixes(trust, target, allowed):
    assert is_allowed_target(target, trust) is allowed


@pytest.mark.parametrize("trust", [["*"], ["my pkg.Net"], ["mypkg.*.Net"], [".mypkg.Net"], [1], {"a": 1}])
def test_a_malformed_trust_entry_is_a_clear_error(trust):
    with pytest.raises(ValueError, match="trust"):
        trusted_names(trust)


def test_a_trusted_own_model_passes_and_untrusted_names_the_fix(stored_config, eval_cfg):
    text = _yaml(_place(stored_config, "model._target_", "mypkg.nets.MyNet"))
    with pytest.raises(ValueError) as refused:
        _eval_config(text, eval_cfg)
    message = str(refused.value)
    assert "model._target_='mypkg.nets.MyNet'" in message and "trust=[mypkg.nets.MyNet]" in message
    for trust in ("[mypkg.nets.MyNet]", "[mypkg.*]"):
        trusted = _compose("eval", ["ckpt=crafted.pt", f"trust={trust}"])
        assert _eval_config(text, trusted).model._target_ == "mypkg.nets.MyNet"
        assert check_stored_config(text, trusted.trust, SOURCE).model._target_ == "mypkg.nets.MyNet"


# --- Console: AR next to AP. ----------------------------------------------------------------

def test_the_printed_instance_table_has_ar_for_segm_and_bbox(tmp_path, capsys):
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    family = {**{k: 10.0 + i for i, k in enumerate(keys)}, "per_class": {"circle": {"AP": 12.5}}}
    report({"segm": family, "bbox": {**family, "AR100": 55.5}}, tmp_path / "metrics.json")
    lines = capsys.readouterr().out.splitlines()
    header = next(line.split() for line in lines if line.split()[:1] == ["AP"])
    assert header == keys
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.split()[:1] in (["segm"], ["bbox"])}
    assert rows["segm"][header.index("AR100")] == "18.00" and rows["bbox"][header.index("AR100")] == "55.50"
    assert rows["bbox"][header.index("ARl")] == "21.00"


# --- Through the real command line (slow). ---------------------------------------------------

def _attack(kind: str, marker: str) -> tuple[object, str, str]:
    """(model node, key named in the refusal, value named in it) of the two reported attacks."""
    if kind == "exec_with_source":
        target = "torch.fx.graph_module._exec_with_source"
        node = {"_target_": target, "src": f"import os; os.system('touch {marker}')",
                "globals": {}, "_convert_": "all"}
        return node, "model._target_", repr(target)
    value = f"${{oc.create:{{_target_: shutil.copyfile, src: {ROOT / 'setup.cfg'}, dst: {marker}}}}}"
    return value, "model", "'oc.create'"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real tiny run's last.pt (what the crafted checkpoints start from)."""
    work = tmp_path_factory.mktemp("trained")
    result = run_cli("train", *TINY, f"hydra.run.dir={work / 'run'}", cwd=work)
    assert result.returncode == 0, result.stderr
    return work / "run" / "checkpoints" / "last.pt"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "resume"])
@pytest.mark.parametrize("kind", ["exec_with_source", "oc_create"])
def test_crafted_checkpoints_run_nothing_through_the_cli(kind, command, trained, tmp_path):
    marker = str(tmp_path / "marker")
    ckpt = load_checkpoint(trained)
    config = OmegaConf.create(ckpt["config"])
    node, key, value = _attack(kind, marker)
    config.model = node
    ckpt["config"] = OmegaConf.to_yaml(config)
    crafted = tmp_path / "run" / "checkpoints" / "last.pt"  # as a downloaded run directory
    crafted.parent.mkdir(parents=True)
    save_checkpoint(ckpt, crafted)
    if command == "eval":
        result = run_cli("eval", f"ckpt={crafted}", cwd=tmp_path)
    else:
        result = run_cli("train", *TINY, "resume=true", f"hydra.run.dir={tmp_path / 'run'}",
                         cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"{key}" in result.stderr and value in result.stderr and "refusing" in result.stderr
    assert "Traceback" not in result.stderr
    assert not Path(marker).exists()


# A user's model taking every key of conf/model/unet.yaml.
OWN_MODEL = ("from segtrain.models.unet import build_unet\n\n\n"
             "def MyNet(**kwargs):\n    return build_unet(**kwargs)\n")


@pytest.mark.slow
def test_own_model_is_refused_without_trust_and_evaluates_with_it(tmp_path):
    (tmp_path / "segtrain_test_own.py").write_text(OWN_MODEL)  # importable: the CLI runs in tmp_path
    run = tmp_path / "run"
    trained = run_cli("train", *TINY, "model._target_=segtrain_test_own.MyNet",
                      "trust=[segtrain_test_own.MyNet]", f"hydra.run.dir={run}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "trust" not in OmegaConf.create(load_checkpoint(run / "checkpoints" / "last.pt")["config"])

    refused = run_cli("eval", f"ckpt={run / 'checkpoints' / 'last.pt'}", cwd=tmp_path)
    assert refused.returncode == 1
    assert "model._target_='segtrain_test_own.MyNet'" in refused.stderr
    assert "trust=[segtrain_test_own.MyNet]" in refused.stderr

    evaluated = run_cli("eval", f"ckpt={run / 'checkpoints' / 'last.pt'}", "trust=[segtrain_test_own.*]",
                        f"output={tmp_path / 'eval.json'}", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads((run / "metrics.json").read_text())


@pytest.fixture
def maskrcnn_checkpoint(tmp_path) -> Path:
    """An untrained tiny Mask R-CNN checkpoint as `segtrain train` writes one (config, meta)."""
    cfg = _compose("train", ["model=maskrcnn_small", "dataset=synthetic_instance",
                             "dataset.val.num_samples=3", "dataset.val.image_size=64",
                             "model.min_size=64", "model.max_size=64", "data.num_workers=0",
                             "trainer.device=cpu"])
    model = instantiate(cfg.model)
    meta = instantiate(cfg.dataset.val).meta
    path = tmp_path / "maskrcnn.pt"
    save_checkpoint({"model": model.state_dict(), "config": _as_train_stores(cfg),
                     "meta": meta.to_dict()}, path)
    return path


@pytest.mark.slow
def test_eval_overrides_a_key_only_the_stored_model_has(maskrcnn_checkpoint, tmp_path):
    """eval.yaml composes the default U-Net; the Mask R-CNN keys of the checkpoint still apply,
    and the console shows AR next to AP."""
    result = run_cli("eval", f"ckpt={maskrcnn_checkpoint}", "model.rpn_post_nms_top_n_test=20",
                     "model.box_score_thresh=0.0", "model.box_detections_per_img=2",
                     f"output={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "eval" / "coco_instances_results.json").read_text())
    per_image = Counter(r["image_id"] for r in results)
    assert per_image and max(per_image.values()) <= 2  # box_detections_per_img=2 took effect
    assert "AR100" in result.stdout and "ARl" in result.stdout


@pytest.mark.slow
def test_eval_override_of_a_key_in_neither_config_names_it(maskrcnn_checkpoint, tmp_path):
    result = run_cli("eval", f"ckpt={maskrcnn_checkpoint}", "model.rpn_post_nms_top_n_tset=20",
                     cwd=tmp_path)
    assert result.returncode == 1
    assert "model.rpn_post_nms_top_n_tset" in result.stderr
    assert "+model.rpn_post_nms_top_n_tset=" in result.stderr  # how to add a key on purpose
    assert "Traceback" not in result.stderr
