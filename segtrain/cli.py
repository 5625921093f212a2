"""The `segtrain` entry point: picks the subcommand, then hands the rest of argv to its Hydra app."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig

from segtrain import __version__

CONFIG_PATH = "pkg://segtrain.conf"
log = logging.getLogger("segtrain")

COMMANDS = {
    "train": "train a model (default: small U-Net on the built-in synthetic dataset)",
    "eval": "evaluate a checkpoint: segtrain eval ckpt=PATH [overrides]",
    "predict": "a checkpoint on new images: predict ckpt=PATH input=DIR|GLOB|FILE|LIST.txt output=DIR\n"
               "[overlay=true] [score_thresh=0.5] [batch_size=8] [device=auto] [overwrite=false]",
    "score": "score prediction files without a model: task=semantic gt=DIR pred=DIR num_classes=N;\n"
             "task=instance|lvis gt=GT.json pred=RESULTS.json;\n"
             "task=panoptic gt=GT.json gt_dir=DIR pred=PRED.json pred_dir=DIR",
    "data": "inspect a dataset: data check dataset=NAME [dataset.root=DIR] [n=100] (layout, labels, sizes);\n"
            "data show dataset=NAME [n=16] [split=train] [output=grid.png] (a grid PNG)",
    "export": "a checkpoint as ONNX / TorchScript / torch.export, checked against the eager model:\n"
              "export ckpt=PATH format=onnx|torchscript|exported_program [output=FILE] [input=IMAGES]\n"
              "[atol=1e-3] [overwrite=false]",
    "model-info": "parameters, FLOPs and latency of a model config: model-info model=NAME\n"
                  "[model.backbone=NAME] [input_size=512|[H,W]] [device=auto] [batch_size=1] [runs=10]\n"
                  "[dataset=NAME (class counts)] [output=info.json]",
    "summarize": "the table of a sweep: summarize SWEEP_DIR [sort=METRIC] [order=desc|asc]",
}
DATA_ACTIONS = ("check", "show")

# Errors a user can cause (bad paths, bad values, bad files, a full or read-only disk): shown as
# one paragraph, no traceback. OSError covers FileNotFoundError, FileExistsError, PermissionError.
USER_ERRORS = (OSError, ValueError, KeyError, FloatingPointError)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def _usage() -> str:
    lines = [f"segtrain {__version__}", "", "usage: segtrain <command> [hydra overrides...]", ""]
    width = max(map(len, COMMANDS))
    for name, text in COMMANDS.items():
        first, *more = text.split("\n")
        lines += [f"  {name:<{width}} {first}", *(" " * (width + 3) + line for line in more)]
    lines += [
        "",
        "`segtrain <command> --help` shows the command's config groups and options (Hydra);",
        "`segtrain <command> --cfg job` prints the composed config.",
    ]
    return "\n".join(lines)


def _run_guarded(fn: Callable[[DictConfig], object], cfg: DictConfig) -> object:
    """Run a command; turn expected user errors into a clear message and exit status 1."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    from segtrain.errors import TrainingInterrupted, user_message

    try:
        try:
            return fn(cfg)
        except InstantiationException as wrapped:
            # Hydra wraps what a dataset/model constructor raised; the user needs the original.
            if isinstance(wrapped.__cause__, (*USER_ERRORS, OmegaConfBaseException)):
                raise wrapped.__cause__ from None
            raise
    except TrainingInterrupted as stop:
        print(str(stop), file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        print(f"\ninterrupted (Ctrl-C): segtrain {_command()} stopped", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except (*USER_ERRORS, OmegaConfBaseException) as err:
        if os.environ.get("SEGTRAIN_DEBUG") or os.environ.get("HYDRA_FULL_ERROR") or _in_multirun():
            # In a sweep, Hydra records the job as failed (with this error) and runs the others.
            raise
        log.debug("error details", exc_info=True)
        print(f"error: {user_message(err, _command())}\n(set SEGTRAIN_DEBUG=1 for the traceback)",
              file=sys.stderr)
        sys.exit(1)


def _command() -> str:
    """The running subcommand (the Hydra job name: train, eval, score, data)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().job.name if HydraConfig.initialized() else "train"


def _end_child_processes(grace_s: float = 2.0) -> None:
    """Kill loader workers still alive when a command ends, so the process can exit.

    Loops shut their workers down on every way out (`segtrain.data.loader.shutdown_workers`);
    this is the last resort: multiprocessing's exit handler would otherwise wait forever on
    workers that ignore SIGTERM.
    """
    if "multiprocessing" not in sys.modules:
        return
    import multiprocessing
    import signal

    children = multiprocessing.active_children()
    if not children:
        return
    # torch's SIGCHLD handler would raise for each worker it sees die.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.join(timeout=grace_s / len(children))
        if child.is_alive():
            child.kill()
            child.join(timeout=grace_s)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def train_app(cfg: DictConfig) -> float | None:
    from segtrain.train import train

    return _run_guarded(train, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def eval_app(cfg: DictConfig) -> None:
    from segtrain.evaluate import evaluate

    _run_guarded(evaluate, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def predict_app(cfg: DictConfig) -> None:
    from segtrain.predict import predict

    _run_guarded(predict, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="score")
def score_app(cfg: DictConfig) -> None:
    from segtrain.score import score

    _run_guarded(score, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="data")
def data_app(cfg: DictConfig) -> None:
    from segtrain.data_check import data

    _run_guarded(data, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def export_app(cfg: DictConfig) -> None:
    from segtrain.exporting.command import export

    _run_guarded(export, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="model_info")
def model_info_app(cfg: DictConfig) -> None:
    from segtrain.model_info import model_info

    _run_guarded(model_info, cfg)


APPS = {"train": train_app, "eval": eval_app, "predict": predict_app, "score": score_app, "data": data_app,
        "export": export_app, "model-info": model_info_app}


def _data_action(rest: list[str]) -> list[str] | None:
    """`data check ...` -> `action=check ...` (None: no valid action word; options pass as they are)."""
    if rest and rest[0] in DATA_ACTIONS:
        return [f"action={rest[0]}", *rest[1:]]
    if any(arg.startswith(("-", "action=")) for arg in rest):
        return rest
    return None


def score_fast(overrides: list[str]) -> None:
    """`segtrain score key=value ...` through Hydra's compose API: the same config, overrides and
    errors as the Hydra app, composed once instead of twice and without Hydra's job machinery —
    about 0.6 s less start-up, which is most of scoring a small file (the command is compared
    with plain pycocotools/panopticapi scripts). The run directory gets `.hydra/config.yaml` and
    `overrides.yaml` as under Hydra; options (`--help`, `--cfg`, `-m`) go to the Hydra app."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict

    try:
        with initialize_config_module(config_module="segtrain.conf", version_base="1.3"):
            cfg = compose("score", overrides, return_hydra_config=True)
    except HydraException as err:
        cause = f"\n{err.__cause__}" if err.__cause__ is not None else ""
        print(f"error: {err}{cause}", file=sys.stderr)
        sys.exit(1)
    run_dir = Path(cfg.hydra.run.dir).absolute()
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    job_cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(job_cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    from segtrain.score import score

    _run_guarded(score, job_cfg)


# Hydra options that print and exit: under torchrun they need no process group.
HYDRA_INFO_OPTIONS = ("-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc",
                      "--shell-completion")


def _rank_overrides(command: str, rest: list[str]) -> list[str]:
    """Overrides that give all torchrun ranks one run directory, where rank 0 alone writes.

    `hydra.run.dir` / `hydra.sweep.dir` are resolved here at rank 0's clock, broadcast over the
    process group (ranks start seconds apart, and `${now:...}` would give each its own
    directory), from the config as the user's overrides compose it, so any pattern (eval's, an
    experiment's) works. Ranks > 0 write no `.hydra/` files and no log file, and log warnings
    only to the console, so torchrun's output is not N copies.
    """
    from datetime import datetime

    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    from segtrain.utils.distributed import broadcast_object, get_rank

    now = broadcast_object(datetime.now())
    values = [arg for arg in rest if not arg.startswith("-")]
    cfg = None
    # Sweep values (a=1,2) do not compose as one job; the directories rarely depend on them.
    for attempt in (values, []):
        try:
            with initialize_config_module(config_module="segtrain.conf", version_base="1.3"):
                cfg = compose(command, attempt, return_hydra_config=True)
            break
        except Exception:  # noqa: BLE001 - the Hydra app reports the user's error itself
            continue
    if cfg is None:
        return []
    HydraConfig.instance().set_config(cfg)
    OmegaConf.register_new_resolver("now", lambda pattern: now.strftime(pattern), replace=True)
    given = {arg.split("=", 1)[0].lstrip("+~") for arg in values if "=" in arg}
    overrides = []
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        if key not in given:
            path = str(OmegaConf.select(cfg, key)).replace("\\", "\\\\").replace("'", "\\'")
            overrides.append(f"{key}='{path}'")
    setup_globals()  # Hydra's own `now` again
    if get_rank() > 0:
        overrides.append("hydra.output_subdir=null")
        if OmegaConf.select(cfg, "hydra.job_logging.handlers.file") is not None:
            overrides += ["hydra.job_logging.root.handlers=[console]",
                          "~hydra.job_logging.handlers.file", "hydra.job_logging.root.level=WARNING"]
    return overrides


def main(argv: list[str] | None = None) -> int:
    """Dispatch `segtrain <command> ...`; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"segtrain {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "summarize":  # not a Hydra app: it reads a sweep directory
        from segtrain.sweep import summarize_command

        return summarize_command(rest)
    if command not in APPS:
        valid = ", ".join(COMMANDS)
        print(f"error: unknown command '{command}'; valid commands: {valid}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    if command == "score" and not any(arg.startswith("-") for arg in rest):
        score_fast(rest)
        return 0
    if command == "data":
        with_action = _data_action(rest)
        if with_action is None:
            given = f"unknown action '{rest[0]}'" if rest and "=" not in rest[0] else "no action given"
            print(f"error: segtrain data: {given}; expected one of: "
                  f"{', '.join(DATA_ACTIONS)} (e.g. segtrain data check dataset=synthetic n=10)",
                  file=sys.stderr)
            return 2
        rest = with_action
    if command in ("eval", "predict", "export"):  # they edit the checkpoint's stored config
        from segtrain.eval_config import eval_overrides

        rest = eval_overrides(rest)
    from segtrain.utils.distributed import (
        destroy_process_group,
        init_process_group_from_env,
        launched_distributed,
    )

    # Under torchrun, train, eval and predict join the process group before Hydra picks the run
    # directory.
    distributed = (command in ("train", "eval", "predict") and launched_distributed()
                   and not any(arg in HYDRA_INFO_OPTIONS for arg in rest))
    try:
        if distributed:
            init_process_group_from_env()
            rest = [*rest, *_rank_overrides(command, rest)]
        # Hydra reads sys.argv itself; the program name shows in its --help output.
        sys.argv = [f"segtrain {command}", *rest]
        APPS[command]()
    finally:
        _end_child_processes()
        destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
