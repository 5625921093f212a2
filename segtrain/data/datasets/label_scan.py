"""One cheap pass over a folder of label maps: the value histogram of each file, cached.

`scan_masks` reads every mask once, on a few threads, and keeps per file the values it holds
and their pixel counts. Results are cached per mask folder in `cache_dir()/label_scan/`, keyed
by each file's name, size and mtime and by how the files are decoded, so a second run (the val
split of the same dataset, the next training run) reads nothing that did not change. The cache
is never written into the dataset's folder; a cache that cannot be read or written is skipped
(logged at debug level), never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from segtrain.data.codecs.image_io import CorruptImageError
from segtrain.utils.files import write_atomically

log = logging.getLogger(__name__)
_CACHE_VERSION = 1


@contextmanager
def untransformed(dataset: object) -> Iterator[None]:
    """`dataset` with its `transforms` off for the block: a pass that reads the data's own labels
    (class shares, categories per image), not those of one random crop of them."""
    transforms = getattr(dataset, "transforms", None)
    if transforms is None:
        yield
        return
    dataset.transforms = None
    try:
        yield
    finally:
        dataset.transforms = transforms


def cache_dir() -> Path:
    """`$SEGTRAIN_CACHE_DIR`, else `$XDG_CACHE_HOME/segtrain`, else `~/.cache/segtrain`."""
    if os.environ.get("SEGTRAIN_CACHE_DIR"):
        return Path(os.environ["SEGTRAIN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "segtrain"


@dataclass
class LabelScan:
    """Raw value histograms of the masks that decoded, flattened over files.

    Entry k says: `files[file_index[k]]` holds `counts[k]` pixels of value `values[k]`.
    `failed` maps each mask that did not decode to its error (left to the item reads, so
    `data.skip_corrupt` still applies to it).
    """

    files: list[Path]
    values: np.ndarray
    counts: np.ndarray
    file_index: np.ndarray
    failed: dict[Path, Exception] = field(default_factory=dict)


def scan_masks(
    paths: Sequence[Path], read: Callable[[Path], torch.Tensor], decode_key: str,
    workers: int | None = None,
) -> LabelScan:
    """Histogram every mask of `paths` (files of one folder) as `read` decodes it.

    `decode_key` names everything that changes what `read` returns for the same file (e.g. a
    palette); it is part of the cache key.
    """
    paths = sorted(Path(p) for p in paths)
    cache_file = _cache_file(paths[0].parent, decode_key) if paths else None
    cached = _load(cache_file)
    entries: dict[str, list] = {}
    todo = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            todo.append((path, None))
            continue
        key = [stat.st_size, stat.st_mtime_ns]
        hit = cached.get(path.name)
        if hit is not None and hit[:2] == key:
            entries[path.name] = hit
        else:
            todo.append((path, key))

    def histogram(item: tuple[Path, list | None]) -> tuple[Path, list | None, Exception | None]:
        path, key = item
        try:
            labels = np.asarray(read(path)).ravel()
        except (ValueError, OSError) as err:  # CorruptImageError is a ValueError
            return path, None, err
        if labels.size and labels.min() < 0:
            values, counts = np.unique(labels, return_counts=True)
        else:
            counts = np.bincount(labels)
            values = np.flatnonzero(counts)
            counts = counts[values]
        return path, [*(key or [None, None]), values.tolist(), counts.tolist()], None

    failed: dict[Path, Exception] = {}
    if todo:
        log.debug("label scan: reading %d of %d masks in %s", len(todo), len(paths), paths[0].parent)
        with ThreadPoolExecutor(min(workers or 8, os.cpu_count() or 1, len(todo))) as pool:
            for path, entry, err in pool.map(histogram, todo):
                if err is not None:
                    failed[path] = err
                else:
                    entries[path.name] = entry
        _save(cache_file, paths[0].parent, decode_key,
              {name: e for name, e in entries.items() if e[0] is not None})
    return _flatten(paths, entries, failed)


def is_corrupt(err: Exception) -> bool:
    """An error the item reads handle on their own (missing or undecodable file)."""
    return isinstance(err, (CorruptImageError, FileNotFoundError)) or (
        isinstance(err, OSError) and not isinstance(err, PermissionError))


def _flatten(paths: list[Path], entries: dict[str, list], failed: dict[Path, Exception]) -> LabelScan:
    files = [p for p in paths if p.name in entries]
    parts = [entries[p.name] for p in files]
    values = np.array([v for e in parts for v in e[2]], dtype=np.int64)
    counts = np.array([c for e in parts for c in e[3]], dtype=np.int64)
    file_index = np.repeat(np.arange(len(files), dtype=np.int64), [len(e[2]) for e in parts])
    return LabelScan(files, values, counts, file_index, failed)


def _cache_file(folder: Path, decode_key: str) -> Path:
    key = json.dumps([_CACHE_VERSION, str(folder.resolve()), decode_key])
    return cache_dir() / "label_scan" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _load(path: Path | None) -> dict[str, list]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
        return data["files"] if data.get("version") == _CACHE_VERSION else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.debug("label scan cache %s unreadable (%s); scanning again", path, err)
        return {}


def _save(path: Path | None, folder: Path, decode_key: str, entries: dict[str, list]) -> None:
    """Write atomically: concurrent runs never see half a file; a refused write is only logged."""
    if path is None:
        return
    data = {"version": _CACHE_VERSION, "folder": str(folder.resolve()), "decode": decode_key,
            "files": entries}
    try:
        write_atomically(path, lambda f: json.dump(data, f, separators=(",", ":")), binary=False)
    except OSError as err:
        log.debug("label scan cache %s not written (%s)", path, err)


# ------------------------------------------------------------------------------------ diagnosis
# A value is rare when it covers under RARE_SHARE of a split's labelled pixels and is found in at
# most max(RARE_MASKS, 1% of the masks): a stray value rather than a class seen in many images.
RARE_SHARE = 1e-3
RARE_MASKS = 2
_SHOWN = 5  # files / values named in a message


@dataclass(frozen=True)
class LabelProblem:
    """One finding of `diagnose`: an "error" stops a run, a "warning" is logged loudly."""

    level: str  # error | warning
    kind: str  # binary, noise, sparse, stray, range, gap, rare, single, void, unreadable
    message: str


@dataclass(frozen=True)
class LabelRules:
    """What the user said about one split's label values.

    num_classes: given (classes.yaml names, `dataset.num_classes`, binarize_threshold's 2), or
    None to count them (largest class value + 1). void_stated: the void value or a mapping was
    given explicitly (classes.yaml `ignore_index`, `label_map`, `binarize_threshold`).
    void_note: how void is named in messages, e.g. "ignore_index=255".
    """

    folder: Path
    num_classes: int | None
    ignore_index: int
    void_stated: bool
    void_note: str


def diagnose(
    scan: LabelScan, to_class: Callable[[np.ndarray], np.ndarray], rules: LabelRules,
) -> tuple[int, list[LabelProblem]]:
    """The number of classes and the problems of one split's label values.

    `to_class` maps raw file values to class values (label_map, void; negative = invalid).
    Errors: 0/255 masks whose 255 would be void (binary masks); counted classes most of which
    have no pixel (noise, grey levels); counted classes that rest on a rare stray value; values
    outside [0, C) that are not void. Warnings: other gaps in counted classes, rare values, a
    single class, all void. See the README's "Your own data".
    """
    classes = to_class(scan.values)
    labelled = classes != rules.ignore_index
    if not labelled.any():
        if rules.num_classes is None:
            raise ValueError(
                f"{rules.folder}: every mask pixel is void ({rules.void_note}); cannot count the "
                "classes. Give dataset.num_classes or ROOT/classes.yaml")
        message = f"{rules.folder}: every mask pixel is void ({rules.void_note})"
        return rules.num_classes, [LabelProblem("warning", "void", message)] if scan.files else []
    stats = _ValueStats(scan, classes, labelled)
    binary = _binary_masks(scan, to_class, rules)
    if binary is not None:
        return rules.num_classes or 1, [binary]
    valid = stats.present[stats.present >= 0]
    count = rules.num_classes if rules.num_classes is not None else (
        int(valid.max()) + 1 if valid.size else 1)
    problems = []
    out = (stats.present < 0) | (stats.present >= count)
    if out.any():
        problems.append(_out_of_range(scan, classes, labelled, count, rules))
    named: set[int] = set()
    if rules.num_classes is None:
        problems += _counted_gaps(stats, valid, count, rules, named)
    if not any(p.kind in ("noise", "sparse") for p in problems):
        rare = [v for v in valid.tolist() if v < count and stats.rare(v) and v not in named]
        if rare:
            problems.append(LabelProblem("warning", "rare", _rare_message(stats, rare, rules)))
    if len(valid) == 1 and not out.any():
        problems.append(LabelProblem("warning", "single", (
            f"{rules.folder}: every labelled pixel is class {int(valid[0])} "
            f"({100 * stats.void_share:.1f}% of the pixels are void): a model learns nothing from "
            "one class, and its mIoU on such data is trivially 100. Check the class values "
            "(`segtrain data check`) or the mapping (dataset.label_map / binarize_threshold)")))
    return count, sorted(problems, key=lambda p: p.level != "error")


class _ValueStats:
    """Pixels, masks and example files per class value of one split (labelled pixels only)."""

    def __init__(self, scan: LabelScan, classes: np.ndarray, labelled: np.ndarray) -> None:
        self.scan, self.classes = scan, classes
        self.present, inverse = np.unique(classes[labelled], return_inverse=True)
        self.pixels = np.bincount(inverse, weights=scan.counts[labelled]).astype(np.int64)
        pairs = np.unique(np.stack([inverse, scan.file_index[labelled]]), axis=1)
        self._pairs = pairs
        self.masks = np.bincount(pairs[0], minlength=len(self.present))
        self.total = int(self.pixels.sum())
        self.void_share = 1 - self.total / max(int(scan.counts.sum()), 1)
        self._index = {int(v): i for i, v in enumerate(self.present)}
        self._rare_masks = max(RARE_MASKS, math.ceil(0.01 * len(scan.files)))

    def __contains__(self, value: int) -> bool:
        return value in self._index

    def rare(self, value: int) -> bool:
        i = self._index[value]
        return self.pixels[i] < RARE_SHARE * self.total and self.masks[i] <= self._rare_masks

    def describe(self, value: int) -> str:
        """'value 7 (3 pixels in 1 mask: a.png)', naming the raw values when a mapping changed them."""
        i = self._index[value]
        raw = np.unique(self.scan.values[self.classes == value]).tolist()
        name = f"value {value}" if raw == [value] else f"class {value} (raw {_join(raw)})"
        files = [self.scan.files[f].name for f in self._pairs[1][self._pairs[0] == i][:_SHOWN]]
        masks = int(self.masks[i])
        more = ", ..." if masks > len(files) else ""
        where = f"{_count(masks, 'mask')}: {', '.join(files)}{more}"
        return f"{name} ({_count(int(self.pixels[i]), 'pixel')} in {where})"


def _binary_masks(scan: LabelScan, to_class: Callable, rules: LabelRules) -> LabelProblem | None:
    """0/255 masks where nothing says what 255 is: void by default, which leaves one class."""
    raw = set(np.unique(scan.values).tolist())
    if (rules.void_stated or raw != {0, 255} or rules.ignore_index != 255
            or to_class(np.array([0, 255])).tolist() != [0, 255]
            or (rules.num_classes is not None and rules.num_classes > 2)):
        return None
    share = 100 * int(scan.counts[scan.values == 255].sum()) / max(int(scan.counts.sum()), 1)
    return LabelProblem("error", "binary", (
        f"{rules.folder}: every mask holds only the values 0 and 255 ({share:.1f}% of the pixels "
        f"are 255; e.g. {_files(scan.files)}). These look like binary masks saved as 0/255: pass "
        "dataset.label_map='{255: 1}' (or dataset.binarize_threshold=127) to make 255 class 1. "
        "As they are, 255 is void (ignore_index) and every labelled pixel class 0: a model "
        "would learn nothing and score mIoU 100. If 255 really is void, write ignore_index: 255 in "
        "ROOT/classes.yaml"))


def _counted_gaps(stats: _ValueStats, valid: np.ndarray, count: int, rules: LabelRules,
                  named: set[int]) -> list[LabelProblem]:
    """Classes counted as the largest value + 1 that have no pixel."""
    values = valid.tolist()
    empty = count - len(values)
    if empty == 0:
        return []
    span = f"{rules.folder}: the masks hold {len(values)} distinct class values in 0..{count - 1}"
    if empty > len(values):  # most counted classes would be empty: these are not class ids
        return [_not_class_ids(stats, values, count, span)]
    missing = [c for c in range(count) if c not in stats]
    above = [v for v in values if v > missing[0]]
    if all(stats.rare(v) for v in above):
        named.update(above)
        stray = "; ".join(stats.describe(v) for v in above[:_SHOWN])
        return [LabelProblem("error", "stray", (
            f"{span}: counted as the largest value + 1 there are {count} classes, but classes "
            f"{_join(missing)} have no pixel and the count rests on {stray}. A stray value? Map it "
            f"with dataset.label_map='{{{above[-1]}: 255}}' (void) or to its class (e.g. "
            f"'{{{above[-1]}: 0}}'); if there really are {count} classes, give "
            f"dataset.num_classes={count} (or names in ROOT/classes.yaml)"))]
    return [LabelProblem("warning", "gap", (
        f"{span}: classes {_join(missing)} have no pixel (counted as the largest value + 1 = "
        f"{count} classes). If the classes really are 0..{count - 1}, give "
        f"dataset.num_classes={count} to say so; otherwise map the values with dataset.label_map"))]


def _not_class_ids(stats: _ValueStats, values: list[int], count: int, span: str) -> LabelProblem:
    seen = set(values)
    adjacent = sum(1 for v in values if v - 1 in seen or v + 1 in seen)
    per_mask = np.bincount(stats.scan.file_index, minlength=len(stats.scan.files))
    noisy = [f"{stats.scan.files[i].name} holds {per_mask[i]} values"
             for i in np.argsort(-per_mask, kind="stable")[:3]]
    head = (f"{span}: counted as the largest value + 1 there would be {count} classes, "
            f"{count - len(values)} of them without a pixel")
    if len(values) >= 8 and 2 * adjacent >= len(values):
        return LabelProblem("error", "noise", (
            f"{head}. Runs of neighbouring values around a few frequent ones are compression or "
            f"interpolation noise (e.g. {', '.join(noisy)}): masks saved as JPEG, or resized with "
            "a smooth filter. Save masks as PNG (resize them nearest-neighbour); for two-class "
            "masks pass dataset.binarize_threshold=127 (value > 127 -> class 1, else 0)"))
    suggestion = "dataset.label_map='{...}'"
    if len(values) <= 12:
        pairs = [f"{v}: {i}" for i, v in enumerate(values) if v != i]
        suggestion = f"dataset.label_map='{{{', '.join(pairs)}}}'"
    return LabelProblem("error", "sparse", (
        f"{head}. Values {_join(values)} look like classes stored as spread-out levels (e.g. "
        f"for visibility): map them to 0..{len(values) - 1} with {suggestion}, or give "
        f"dataset.num_classes={count} (or ROOT/classes.yaml) if there really are {count} classes"))


def _out_of_range(scan: LabelScan, classes: np.ndarray, labelled: np.ndarray, count: int,
                  rules: LabelRules) -> LabelProblem:
    bad = labelled & ((classes < 0) | (classes >= count))
    files = np.unique(scan.file_index[bad])
    lines = []
    for f in files[:_SHOWN]:
        here = bad & (scan.file_index == f)
        lines.append(f"  {scan.files[f]}: label values {np.unique(scan.values[here]).tolist()[:8]} "
                     f"are outside [0, {count}) ({_count(int(scan.counts[here].sum()), 'pixel')})")
    if len(files) > _SHOWN:
        lines.append(f"  ... and {len(files) - _SHOWN} more masks")
    values = np.unique(scan.values[bad]).tolist()
    hint = ""
    if len(values) >= 8:
        hint = (f" {len(values)} distinct stray values look like compression noise (masks saved "
                "as JPEG?): save masks as PNG; two-class masks: dataset.binarize_threshold=127.")
    return LabelProblem("error", "range", (
        f"{len(files)} of {len(scan.files)} masks in {rules.folder} hold label values outside "
        f"the {count} classes [0, {count}) that are not void ({rules.void_note}):\n"
        + "\n".join(lines) + f"\n{hint.strip() + ' ' if hint else ''}Give the classes (names in "
        f"ROOT/classes.yaml or dataset.num_classes) or map the values with dataset.label_map "
        f"(e.g. '{{{values[0]}: 255}}' makes {values[0]} void)"))


def _rare_message(stats: _ValueStats, rare: list[int], rules: LabelRules) -> str:
    shown = "; ".join(stats.describe(v) for v in rare[:_SHOWN])
    more = f" and {len(rare) - _SHOWN} more" if len(rare) > _SHOWN else ""
    return (f"{rules.folder}: rare label values, each under {100 * RARE_SHARE:g}% of the labelled "
            f"pixels: {shown}{more}. Stray values? Map them with dataset.label_map (e.g. "
            f"'{{{rare[0]}: 255}}' makes {rare[0]} void)")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _join(values: Sequence[int]) -> str:
    shown = ", ".join(str(v) for v in values[:8])
    return shown + (f", ... ({len(values)} in all)" if len(values) > 8 else "")


def _files(files: Sequence[Path]) -> str:
    names = ", ".join(p.name for p in files[:_SHOWN])
    return names + (f", ... ({len(files)} masks)" if len(files) > _SHOWN else "")
