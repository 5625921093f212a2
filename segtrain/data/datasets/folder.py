"""Users' own semantic segmentation data as plain folders of images and label PNGs, no code."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from segtrain.data.codecs.image_io import read_image, read_label
from segtrain.data.datasets.label_scan import LabelProblem, LabelRules, diagnose, is_corrupt, scan_masks
from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.utils.distributed import is_main_process

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
MASK_SUFFIXES = (".png",)
JPEG_SUFFIXES = (".jpg", ".jpeg")  # masks only with dataset.binarize_threshold
EXPECTED_TREE = """\
    ROOT/
      classes.yaml          (optional) names: [...], palette: [[r, g, b], ...], ignore_index: 255
      train/images/*.jpg    (.jpg .jpeg .png .tif .tiff)
      train/masks/*.png     one per image, same file stem; pixel values = class ids
      val/images/...
      val/masks/..."""
_SHOWN = 5  # stems / values named in an error message
_INVALID = -1  # class value of a raw value that is neither a class nor void (an error when met)


class FolderDataset(Dataset):
    """`ROOT/{split}/images/*` with `ROOT/{split}/masks/*.png` matched by file stem.

    Classes come from the optional `ROOT/classes.yaml` (`names`, `palette`, `ignore_index` = the
    raw mask value of void pixels, which becomes `ignore_index` in targets), else `num_classes`,
    else they are counted from this split's masks (the largest value + 1, named "0", "1", ...).
    A raw value is mapped: `binarize_threshold` (value > threshold -> 1, else 0: two-class masks,
    JPEG masks accepted) or else `label_map` (e.g. {255: 1} for 0/255 binary masks, {11: 255} to
    make 11 void), then the classes.yaml void value -> `ignore_index`. Colour (RGB) masks are
    mapped to ids through the classes.yaml palette (with `binarize_threshold`: their grey level).

    At construction every mask is scanned once (threaded, cached by `label_scan`) and the
    label values judged by `label_scan.diagnose`. Errors, raised as one ValueError naming files
    and the fix: 0/255 masks with nothing saying what 255 is (binary masks; 255 would be void),
    counted classes most of which have no pixel (compression noise, spread-out levels), counted
    classes resting on a rare stray value, values outside [0, num_classes) that are not void.
    Warnings, logged: other empty counted classes, rare values, a single class. `strict=False`
    keeps them all in `label_problems` instead of raising or logging (`segtrain data check`).

    Returns `(image, target)`: image `tv_tensors.Image` uint8 (3, H, W); target dict with
    `semantic` Mask int64 (H, W) in [0, num_classes) or `ignore_index` (void), `image_id` (the
    index), `orig_size` int64 [H, W], `file_name` (the stem). Values outside the classes and a
    mask whose size differs from its image are ValueErrors naming the file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        num_classes: int | None = None,
        ignore_index: int = 255,
        label_map: Mapping[int, int] | None = None,
        binarize_threshold: int | None = None,
        transforms: Callable | None = None,
        strict: bool = True,
    ) -> None:
        if root is None:
            raise ValueError(f"dataset=folder needs dataset.root=PATH, a folder laid out as\n{EXPECTED_TREE}")
        self.root, self.split = Path(root), str(split)
        self.ignore_index, self.transforms = int(ignore_index), transforms
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
        self.binarize_threshold = None if binarize_threshold is None else int(binarize_threshold)
        self.images, self.masks = _list_pairs(self.root, self.split, self.binarize_threshold is not None)
        self.stems = sorted(self.images)
        classes = _read_classes(self.root / "classes.yaml")
        names = classes.get("names")
        given = len(names) if names is not None else (
            2 if self.binarize_threshold is not None else num_classes)
        self._check_options(classes, num_classes, names)
        # The raw value that means void in the files; it becomes `ignore_index` in targets.
        self._raw_ignore = int(classes.get("ignore_index", self.ignore_index))
        self._palette_codes = None
        if classes.get("palette") is not None:
            self._palette_codes = torch.tensor([_code(c) for c in classes["palette"]], dtype=torch.int64)
        self._table = self._value_table()
        self._identity = bool(torch.equal(self._table, torch.arange(len(self._table))))
        count, self.label_problems = self._scan_labels(
            None if given is None else int(given), "ignore_index" in classes)
        if strict:
            _raise_or_log(self.label_problems)
        names = names or [str(i) for i in range(count)]
        palette = classes.get("palette") or default_palette(len(names))
        self.meta = DatasetMeta(classes=names, palette=palette, ignore_index=self.ignore_index,
                                stuff_ids=list(range(len(names))))
        self.num_classes = self.meta.num_classes

    @property
    def void_note(self) -> str:
        """How void is written in the files and in targets, e.g. for `segtrain data check`."""
        if self._raw_ignore == self.ignore_index:
            return f"ignore_index={self.ignore_index}"
        return f"raw value {self._raw_ignore} in the files -> ignore_index={self.ignore_index}"

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        index = int(index)
        stem = self.stems[index]
        image = read_image(self.images[stem])
        raw = self._read_raw(self.masks[stem])
        semantic = self._to_classes(raw)
        if tuple(semantic.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"{self.masks[stem]} is {tuple(semantic.shape)} (H, W) but its image "
                f"{self.images[stem].name} is {tuple(image.shape[-2:])}; a mask must match its image's size"
            )
        bad = ((semantic < 0) | (semantic >= self.num_classes)) & (semantic != self.ignore_index)
        if bad.any():
            values = torch.unique(raw[bad]).tolist()  # as the file holds them
            raise ValueError(
                f"{self.masks[stem]}: label values {values[:_SHOWN]} are outside the "
                f"{self.num_classes} classes [0, {self.num_classes}) and not void ({self.void_note}); "
                f"map them with dataset.label_map (e.g. '{{{values[0]}: 255}}' to make them void) "
                "or list the classes in ROOT/classes.yaml"
            )
        target = {
            "semantic": tv_tensors.Mask(semantic),
            "image_id": index,
            "orig_size": torch.tensor(image.shape[-2:], dtype=torch.int64),
            "file_name": stem,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def read_mask(self, path: Path) -> torch.Tensor:
        """Mask file -> int64 (H, W) of class ids after the mapping; void = `ignore_index`."""
        return self._to_classes(self._read_raw(path))

    def _read_raw(self, path: Path, widen: bool = True) -> torch.Tensor:
        """The values as stored: grey levels, palette indices, or class ids of palette colours."""
        try:
            with Image.open(path) as pil:  # the header only: is it a colour rendering?
                colour = pil.mode in ("RGB", "RGBA")
        except OSError:  # read_label names the problem (a CorruptImageError, data.skip_corrupt)
            colour = False
        if colour and self.binarize_threshold is not None:
            return _grey(read_image(path))
        if colour and self._palette_codes is not None:
            return self._colours_to_ids(read_image(path), path)
        return read_label(path, widen=widen)  # grey-valued RGB reads as grey; other colour is an error

    def _value_table(self) -> torch.Tensor:
        """Class value of each raw value 0..N-1 (larger ones map to themselves): one gather.

        binarize_threshold, else label_map then the void value -> ignore_index. When classes.yaml
        names another void value, a raw `ignore_index` (255) that label_map does not map is
        neither a class nor void: invalid, so the checks report it.
        """
        size = max(1 << 16, self._raw_ignore + 1, self.ignore_index + 1, *(k + 1 for k in self.label_map))
        raw = torch.arange(size, dtype=torch.int64)
        if self.binarize_threshold is not None:
            return (raw > self.binarize_threshold).to(torch.int64)
        table = raw.clone()
        for src, dst in self.label_map.items():
            table[src] = dst
        if self._raw_ignore != self.ignore_index:
            if self.ignore_index not in self.label_map:
                table[self.ignore_index] = _INVALID
            table[table == self._raw_ignore] = self.ignore_index
        return table

    def _to_classes(self, raw: torch.Tensor) -> torch.Tensor:
        raw = raw.to(torch.int64)
        if self._identity:  # no mapping: the common case costs nothing per item
            return raw
        size = len(self._table)
        inside = (raw >= 0) & (raw < size)
        if bool(inside.all()):
            return self._table[raw]
        return torch.where(inside, self._table[raw.clamp(0, size - 1)], raw)

    def _scan_labels(self, given: int | None, void_stated: bool) -> tuple[int, list[LabelProblem]]:
        """One threaded, cached pass over this split's masks; (number of classes, problems)."""
        decode = json.dumps({"palette": None if self._palette_codes is None else self._palette_codes.tolist(),
                             "grey_colour": self.binarize_threshold is not None})
        scan = scan_masks(list(self.masks.values()), lambda p: self._read_raw(p, widen=False), decode)
        self._scan = scan  # per-file value histograms: image_categories without reading again
        unreadable = {p: e for p, e in scan.failed.items() if not is_corrupt(e)}
        if not scan.files and scan.failed and given is None:
            raise next(iter(scan.failed.values()))  # nothing decodes: the classes cannot be counted
        rules = LabelRules(
            folder=self.root / self.split / "masks", num_classes=given, ignore_index=self.ignore_index,
            void_stated=void_stated or bool(self.label_map) or self.binarize_threshold is not None,
            void_note=self.void_note)
        count, problems = diagnose(scan, lambda v: self._to_classes(torch.from_numpy(v)).numpy(), rules)
        if unreadable:
            first = next(iter(unreadable.values()))
            more = f" ({len(unreadable) - 1} more masks fail like it)" if len(unreadable) > 1 else ""
            problems.insert(0, LabelProblem("error", "unreadable", f"{first}{more}"))
        return count, problems

    def image_categories(self) -> list[list[int]]:
        """Each item's classes present (void excluded, sorted), from the label scan made at load:
        no mask is read again. A mask the scan could not decode gives [] (reading its item
        fails on its own). For `data.sampler=repeat_factor`."""
        scan = self._scan
        classes = self._to_classes(torch.from_numpy(scan.values)).tolist()
        per_file: list[set[int]] = [set() for _ in scan.files]
        for k, c in zip(scan.file_index.tolist(), classes):
            if 0 <= c < self.num_classes and c != self.ignore_index:
                per_file[k].add(c)
        row = {path: k for k, path in enumerate(scan.files)}
        return [sorted(per_file[row[Path(self.masks[stem])]]) if Path(self.masks[stem]) in row else []
                for stem in self.stems]

    def _check_options(self, classes: dict[str, Any], num_classes: int | None, names: list | None) -> None:
        file = self.root / "classes.yaml"
        if any(src < 0 for src in self.label_map):
            raise ValueError(f"dataset.label_map={self.label_map}: keys are raw mask values, >= 0")
        if self.binarize_threshold is not None:
            conflicts = [what for what, there in (
                (f"dataset.label_map={self.label_map}", self.label_map),
                (f"ignore_index in {file}", "ignore_index" in classes),
                (f"dataset.num_classes={num_classes}", num_classes not in (None, 2)),
                (f"{names and len(names)} class names in {file}", names is not None and len(names) != 2),
            ) if there]
            if conflicts or self.binarize_threshold < 0:
                raise ValueError(
                    f"dataset.binarize_threshold={self.binarize_threshold} makes two classes (value > "
                    f"threshold -> 1, else 0, no void) and takes a threshold >= 0; it cannot be "
                    f"combined with {' or '.join(conflicts) or 'a negative threshold'}")
        elif names is not None and num_classes is not None and int(num_classes) != len(names):
            raise ValueError(
                f"dataset.num_classes={num_classes} but {file} names "
                f"{len(names)} classes; set dataset.num_classes=null to take them from the file"
            )

    def _colours_to_ids(self, rgb: torch.Tensor, path: Path) -> torch.Tensor:
        codes = (rgb[0].long() << 16) | (rgb[1].long() << 8) | rgb[2].long()
        order = torch.argsort(self._palette_codes)
        sorted_codes = self._palette_codes[order]
        pos = torch.searchsorted(sorted_codes, codes).clamp_(max=len(sorted_codes) - 1)
        unknown = sorted_codes[pos] != codes
        if unknown.any():
            code = int(codes[unknown][0])
            raise ValueError(
                f"{path}: colour {(code >> 16, (code >> 8) & 255, code & 255)} is not in the palette "
                f"of {self.root / 'classes.yaml'} ({int(unknown.sum())} pixels); add it to `palette` "
                "(one colour per class) or repaint those pixels"
            )
        return order[pos]


def _raise_or_log(problems: list[LabelProblem]) -> None:
    """Log the warnings (rank 0), then raise the errors as one ValueError."""
    if is_main_process():
        for problem in problems:
            if problem.level == "warning":
                log.warning("%s", problem.message)
    errors = [p.message for p in problems if p.level == "error"]
    if errors:
        raise ValueError("\n".join(errors))


def _grey(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 (H, W) luma of an RGB image (ITU-R 601-2, as PIL's "L"): JPEG'd grey masks."""
    weights = torch.tensor([299, 587, 114], dtype=torch.int32).view(3, 1, 1)
    return ((rgb.to(torch.int32) * weights).sum(0).add_(500) // 1000).to(torch.uint8)


def _list_pairs(root: Path, split: str, jpeg_masks: bool = False) -> tuple[dict[str, Path], dict[str, Path]]:
    """Image and mask files of a split by stem; layout problems are errors showing the tree.

    JPEG masks are refused (lossy compression changes label values) unless `jpeg_masks`.
    """
    def fail(problem: str) -> FileNotFoundError | ValueError:
        kind = FileNotFoundError if "not found" in problem else ValueError
        return kind(f"dataset=folder: {problem}. Expected the layout\n{EXPECTED_TREE}\n(ROOT = {root})")

    if not root.is_dir():
        raise fail(f"dataset.root {root} not found or not a folder")
    folders = {}
    for part in ("images", "masks"):
        folder = root / split / part
        if not folder.is_dir():
            raise fail(f"{folder} not found (split '{split}')")
        folders[part] = folder
    images = _by_stem(folders["images"], IMAGE_SUFFIXES, fail)
    if not jpeg_masks:
        _refuse_jpeg_masks(folders["masks"])
    masks = _by_stem(folders["masks"], MASK_SUFFIXES + (JPEG_SUFFIXES if jpeg_masks else ()), fail)
    if not images:
        raise fail(f"{folders['images']} holds no images")
    for what, stems, other in (("images", images.keys() - masks.keys(), folders["masks"]),
                               ("masks", masks.keys() - images.keys(), folders["images"])):
        if stems:
            shown = ", ".join(sorted(stems)[:_SHOWN]) + (", ..." if len(stems) > _SHOWN else "")
            raise fail(f"{len(stems)} {what} in {root / split / what} have no counterpart with the "
                       f"same stem in {other}: {shown}")
    return images, masks


def _refuse_jpeg_masks(folder: Path) -> None:
    jpegs = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in JPEG_SUFFIXES)
    if jpegs:
        shown = ", ".join(jpegs[:_SHOWN]) + (", ..." if len(jpegs) > _SHOWN else "")
        raise ValueError(
            f"{folder} holds {len(jpegs)} JPEG masks ({shown}): JPEG's lossy compression changes "
            "label values (a 0/255 mask gains values in between), so JPEG masks are refused. Save "
            "the masks as PNG; for two-class masks pass dataset.binarize_threshold=127 (value > "
            "127 -> class 1, else 0), which accepts JPEG masks"
        )


def _by_stem(folder: Path, suffixes: tuple[str, ...], fail: Callable) -> dict[str, Path]:
    files: dict[str, Path] = {}
    stray = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):  # .DS_Store and the like
            continue
        if not path.is_file() or path.suffix.lower() not in suffixes:
            stray.append(path.name)
        elif path.stem in files:
            raise fail(f"{folder} holds both {files[path.stem].name} and {path.name}; stems must be unique")
        else:
            files[path.stem] = path
    if stray:
        shown = ", ".join(stray[:_SHOWN]) + (", ..." if len(stray) > _SHOWN else "")
        raise fail(f"{folder} holds {len(stray)} files that are not {'/'.join(suffixes)}: {shown}; "
                   "move them out")
    return files


def _read_classes(path: Path) -> dict[str, Any]:
    """classes.yaml as a dict (empty when absent), checked: names a list, one colour per name."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    expected = "expected keys names: [a, b, ...], palette: [[r, g, b], ...], ignore_index: 255"
    if not isinstance(data, dict) or set(data) - {"names", "palette", "ignore_index"}:
        raise ValueError(f"{path}: unexpected content {data!r:.200}; {expected}")
    names, palette = data.get("names"), data.get("palette")
    if names is not None and (not isinstance(names, list) or not names):
        raise ValueError(f"{path}: names is {names!r}; {expected}")
    if palette is not None:
        ok = isinstance(palette, list) and all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in palette)
        if not ok or (names is not None and len(palette) != len(names)):
            raise ValueError(f"{path}: palette must be one [r, g, b] (0..255) per name; {expected}")
        if len({tuple(c) for c in palette}) != len(palette):
            raise ValueError(f"{path}: palette repeats a colour; each class needs its own")
        if names is None:
            data["names"] = [str(i) for i in range(len(palette))]
    return data


def _code(colour: list[int]) -> int:
    return (int(colour[0]) << 16) | (int(colour[1]) << 8) | int(colour[2])

