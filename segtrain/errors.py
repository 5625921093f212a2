"""Exceptions the command line turns into exit statuses, and the one-paragraph messages it prints
for user errors (torch-free, so every command can use them)."""

from __future__ import annotations

import re
from pathlib import Path


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written. Carries the exit status to use."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# Usage hints for the values a command cannot run without (`???` in its YAML).
REQUIRED_VALUE_HINTS = {
    "ckpt": "the checkpoint to use, e.g. ckpt=outputs/<date>/<time>/checkpoints/last.pt",
    "gt": "the ground truth: a label PNG folder (task=semantic) or a JSON file (instance, lvis, panoptic)",
    "pred": "the predictions: a PNG folder (task=semantic) or a results JSON (instance, lvis, panoptic)",
    "action": "check or show, e.g. segtrain data check dataset=synthetic",
    "input": "the images: a folder, a quoted glob ('photos/*.jpg'), an image file or a .txt list of paths",
    "output": "the folder to write the predictions into, e.g. output=predictions",
}
_WORKER_ERROR = re.compile(r"^Caught (\w+) in DataLoader worker process (\d+)\.\nOriginal Traceback")
_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in (\S+)', re.MULTILINE)


def user_message(err: BaseException, command: str = "train") -> str:
    """The one paragraph the command line prints for a user error (no traceback)."""
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    if isinstance(err, MissingMandatoryValue):
        key = getattr(err, "full_key", None) or "a value"
        hint = REQUIRED_VALUE_HINTS.get(str(key), "see `segtrain {command} --help`")
        return f"segtrain {command} needs {key}=...: {hint}"
    if isinstance(err, OmegaConfBaseException):
        key = getattr(err, "full_key", None)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"config key '{key}': {first}" if key else first
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return worker_error_summary(str(text)) or str(text) or type(err).__name__


def worker_error_summary(text: str) -> str | None:
    """An error a DataLoader worker raised, re-raised by torch with the worker's whole traceback
    as its message, as that error's own message plus where it was raised; None for other text."""
    match = _WORKER_ERROR.match(text)
    if match is None:
        return None
    name, worker = match.groups()
    marker = f"\n{name}: "
    at = text.rfind(marker)
    message = text[at + len(marker):].strip() if at >= 0 else text.splitlines()[-1]
    frames = _FRAME.findall(text)
    where = f" ({Path(frames[-1][0]).name}:{frames[-1][1]} in {frames[-1][2]})" if frames else ""
    return f"{message}\n[{name} raised in data loader worker {worker}{where}]"
