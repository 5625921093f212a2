"""The images `segtrain predict` reads: the input list (folder, glob, file or list file), a
dataset decoding them as training does, and a collate that drops (and records) unreadable files."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from segtrain.data.codecs.file_names import IMAGE_SUFFIXES, image_stem, is_image_name
from segtrain.data.codecs.image_io import read_image

_GLOB_CHARS = ("*", "?", "[")
LIST_SUFFIX = ".txt"


def list_images(spec: str | os.PathLike) -> list[Path]:
    """The image files `input=` names, in the order they are predicted.

    - a folder: the image files in it (not in sub-folders), sorted by name;
    - a glob pattern (`*`, `?`, `[...]`; `**` reaches into sub-folders): matching image files, sorted;
    - a `.txt` file: one path per line (blank lines and lines starting with `#` skipped), relative
      paths under the list's folder, in the list's order;
    - any other file: that image.
    Image files end in IMAGE_SUFFIXES (any case). FileNotFoundError when nothing matches or a
    listed file is missing; ValueError when two images share a stem (their outputs would collide).
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and is_image_name(p))
    elif path.is_file() and path.suffix.lower() == LIST_SUFFIX:
        found = _read_list(path)
    elif path.is_file():
        if not is_image_name(path):
            raise ValueError(f"input={text} is not an image file; expected one of "
                             f"{' '.join(IMAGE_SUFFIXES)}, a folder, a glob pattern or a .txt list")
        found = [path]
    elif any(char in text for char in _GLOB_CHARS):
        found = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True)
                       if Path(p).is_file() and is_image_name(p))
    else:
        raise FileNotFoundError(f"input={text}: no such file or folder; expected a folder of images, "
                                "a glob pattern (quoted), an image file or a .txt list of paths")
    if not found:
        raise FileNotFoundError(f"input={text} names no image files; expected files ending in "
                                f"{' '.join(IMAGE_SUFFIXES)} (any case)")
    check_unique_stems(found)
    return found


def _read_list(list_path: Path) -> list[Path]:
    paths = []
    for number, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else list_path.parent / path
        if not path.is_file():
            raise FileNotFoundError(f"input={list_path}, line {number}: image file not found: {path} "
                                    "(relative paths are under the list's folder)")
        if not is_image_name(path):
            raise ValueError(f"input={list_path}, line {number}: {path} is not an image file; "
                             f"expected one of {' '.join(IMAGE_SUFFIXES)}")
        paths.append(path)
    return paths


def check_unique_stems(paths: list[Path]) -> None:
    """ValueError naming both files when two images share a stem (`a.png`, `a.jpg`, or `a.png`
    in two folders): each image's outputs are named by its stem."""
    seen: dict[str, Path] = {}
    for path in paths:
        stem = image_stem(path)
        if stem in seen:
            raise ValueError(f"{seen[stem]} and {path} have the same stem {stem!r}, and their "
                             f"predictions would overwrite each other (OUT/*/{stem}.png); rename "
                             "one or predict them in separate runs")
        seen[stem] = path


@dataclass(frozen=True)
class Unreadable:
    """What the dataset returns for a file that does not decode: its path and the error."""

    path: str
    error: str


class ImageFiles(Dataset):
    """Decodes `paths[i]` with `read_image` (as training does: RGB uint8, 16-bit scaled, grey and
    alpha dropped), EXIF orientation applied: (image uint8 (3, H, W), target {"image_id": i,
    "orig_size": int64 [H, W], "file_name": stem}, the file's name), or `Unreadable` for a file
    that does not decode.
    """

    def __init__(self, paths: list[Path], exif_orientation: bool = True) -> None:
        self.paths = [Path(p) for p in paths]
        self.exif_orientation = exif_orientation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, dict, str] | Unreadable:
        path = self.paths[index]
        try:
            image = read_image(path, exif_orientation=self.exif_orientation)
        # CorruptImageError (a ValueError) for a file that does not decode; OSError for one that
        # vanished or cannot be read since it was listed.
        except (ValueError, OSError) as err:
            return Unreadable(str(path), str(err))
        target = {"image_id": index, "orig_size": torch.tensor(image.shape[-2:], dtype=torch.int64),
                  "file_name": image_stem(path)}
        return image, target, path.name


@dataclass
class PredictBatch:
    """One loader batch of `segtrain predict`: the task's batch (None when every file of it was
    unreadable), each decodable image (uint8 (3, H, W), for overlays; None when not kept), its
    target with `file_name` the file's name (e.g. "a.jpg"; the task's targets hold the stem), and
    the files that did not decode."""

    batch: dict[str, Any] | None
    images: list[torch.Tensor] | None
    targets: list[dict[str, Any]]
    skipped: list[Unreadable]

    def pin_memory(self) -> PredictBatch:
        """The task's batch in page-locked memory (what DataLoader(pin_memory=True) calls), so
        that its copy to the GPU is asynchronous; images and targets stay on the CPU side."""
        return replace(self, batch=_pinned(self.batch))


def _pinned(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.pin_memory()
    if isinstance(obj, dict):
        return {key: _pinned(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pinned(value) for value in obj)
    return obj


class SkippingCollate:
    """Collates the decodable items with the task's collate and passes the unreadable ones on.

    A class rather than a closure so that worker processes started by spawn can unpickle it.
    keep_images: also return the images themselves (the overlays draw on them).
    """

    def __init__(self, collate_fn: Callable[[list], dict], keep_images: bool) -> None:
        self.collate_fn, self.keep_images = collate_fn, keep_images

    def __call__(self, items: list[tuple[Any, dict, str] | Unreadable]) -> PredictBatch:
        decoded = [item for item in items if not isinstance(item, Unreadable)]
        skipped = [item for item in items if isinstance(item, Unreadable)]
        images = [image.as_subclass(torch.Tensor) for image, _, _ in decoded] if self.keep_images else None
        batch = self.collate_fn([(image, target) for image, target, _ in decoded]) if decoded else None
        return PredictBatch(batch, images, [{**target, "file_name": name} for _, target, name in decoded],
                            skipped)
