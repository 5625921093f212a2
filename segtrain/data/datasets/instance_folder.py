"""Users' own instance segmentation data as plain folders of mask files: no code, no JSON.

Three layouts (`layout`: auto | per_sample | per_object | instance_map), under ROOT/{train,val}/
or, when ROOT holds one set, under ROOT (or ROOT/train) split by a seeded `val_fraction`:
see `TREES`. Targets are what the COCO instance datasets give (DESIGN "Data contract").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from segtrain.data.codecs.image_io import read_image, read_label
from segtrain.data.datasets.folder import IMAGE_SUFFIXES, _by_stem, _read_classes
from segtrain.data.datasets.label_scan import LabelProblem
from segtrain.data.datasets.layout import check_same_size
from segtrain.data.datasets.panoptic import masks_to_boxes
from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.utils.distributed import is_main_process

log = logging.getLogger(__name__)
LAYOUTS = ("per_sample", "per_object", "instance_map")
MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")  # JPEG: thresholded
MAP_SUFFIXES = (".png", ".tif", ".tiff")  # instance-id and class maps (16-bit allowed)
TREES = {
    "per_sample": "ROOT/<id>/images/<id>.png   one image per sample folder\n"
                  "ROOT/<id>/masks/*.png       one binary mask per object (e.g. Data Science Bowl 2018)",
    "per_object": "ROOT/images/<stem>.jpg\n"
                  "ROOT/masks/<stem>/*.png     one binary mask per object",
    "instance_map": "ROOT/images/<stem>.jpg\n"
                    "ROOT/instances/<stem>.png   object ids (.png or .tif, 16-bit allowed), 0 = background\n"
                    "ROOT/classes/<stem>.png     (optional) semantic map: an object's class is the value\n"
                    "                            under it",
}
ALL_TREES = "\n".join(f"  {name}:\n    " + tree.replace("\n", "\n    ") for name, tree in TREES.items()) + (
    "\n  each under ROOT/train/ and ROOT/val/, or once under ROOT (split by dataset.val_fraction);"
    "\n  optional ROOT/classes.yaml: names: [background, ...], palette: [[r, g, b], ...]")
_SHOWN = 5


@dataclass(frozen=True)
class Sample:
    """One image's files: per-object masks, or an instance-id map (+ optional class map)."""

    stem: str
    image: Path
    masks: tuple[Path, ...] = ()
    instances: Path | None = None
    classes: Path | None = None


class InstanceFolderDataset(Dataset):
    """Instance targets read from mask files (the layouts of `TREES`), no annotation JSON.

    Classes: `ROOT/classes.yaml` names them (index = value in the class maps, 0 = background);
    without it one class "object", or with class maps `num_classes` or the largest class value
    + 1. Per-object masks that are not exactly binary (JPEG, anti-aliased) are thresholded at
    half their maximum (value > max // 2); empty masks are skipped; overlapping objects stay
    separate masks (COCO allows overlap). Each first case is logged once per process, and
    `label_problems` counts them all for `segtrain data check`.

    Returns `(image, target)`: image `tv_tensors.Image` uint8 (3, H, W); target `boxes`
    BoundingBoxes XYXY float32 (N, 4) of the mask pixels (x2, y2 exclusive), `masks` Mask bool
    (N, H, W) (file order; id order for id maps), `labels` int64 (N,) in 1..K (the class
    value), `iscrowd` int64 zeros, `image_id` (the index), `orig_size` int64 [H, W], `file_name`
    (the stem).
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str = "train",
        layout: str = "auto",
        val_fraction: float | None = 0.1,
        seed: int = 0,
        num_classes: int | None = None,
        transforms: Callable | None = None,
    ) -> None:
        if root is None:
            raise ValueError(f"dataset=instance_folder needs dataset.root=PATH laid out as one of\n"
                             f"{ALL_TREES}")
        if split not in ("train", "val"):
            raise ValueError(f"dataset=instance_folder: split={split!r}; expected train or val")
        if layout not in ("auto", *LAYOUTS):
            raise ValueError(f"dataset.layout={layout!r}; expected auto or one of {', '.join(LAYOUTS)}")
        if val_fraction is not None and not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"dataset.val_fraction={val_fraction}; expected a fraction in (0, 1), e.g. 0.1")
        self.root, self.split, self.transforms = Path(root), split, transforms
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset.root {self.root} not found or not a folder; expected\n"
                                    f"{ALL_TREES}")
        self.layout, self.samples = find_samples(self.root, split, layout, val_fraction, int(seed))
        self.meta = self._build_meta(num_classes)
        self.num_classes = self.meta.num_classes
        self._found: dict[str, dict[str, None]] = {"thresholded": {}, "empty": {}}

    # ------------------------------------------------------------------------------ setup
    def _build_meta(self, num_classes: int | None) -> DatasetMeta:
        file = self.root / "classes.yaml"
        classes = _read_classes(file)
        names = classes.get("names")
        has_maps = any(s.classes is not None for s in self.samples)
        if names is None:
            count = int(num_classes) if num_classes is not None else (
                _largest_class(self.samples) + 1 if has_maps else 2)
            names = ["background", *(str(k) for k in range(1, count))] if has_maps else [
                "background", "object"]
        if num_classes is not None and int(num_classes) != len(names):
            source = file if file.is_file() else "the data"
            raise ValueError(f"dataset.num_classes={num_classes} but {source} gives {len(names)} classes "
                             "(background included); set dataset.num_classes=null")
        if not has_maps and len(names) != 2:
            source = file if file.is_file() else f"dataset.num_classes={num_classes}"
            raise ValueError(
                f"{source} gives {len(names)} classes, but layout {self.layout} without class maps has "
                "one object class: list two names (background and the object class), or add class maps "
                "(layout instance_map)")
        if len(names) < 2:
            raise ValueError(f"{file}: names {names}; expected background and at least one object class")
        palette = classes.get("palette") or default_palette(len(names))
        return DatasetMeta(classes=names, palette=palette, thing_ids=list(range(1, len(names))),
                           stuff_ids=[0])

    # ------------------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        index = int(index)
        sample = self.samples[index]
        image = read_image(sample.image)
        if sample.instances is not None:
            masks, labels, boxes = self._read_id_map(sample, image)
        else:
            masks, labels = self._read_object_masks(sample, image)
            boxes = masks_to_boxes(masks)
        height, width = image.shape[-2:]
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "masks": tv_tensors.Mask(masks),
            "labels": labels,
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
            "image_id": index,
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "file_name": sample.stem,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _read_object_masks(self, sample: Sample, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each file decoded once, thresholded into one bool (N, H, W); numpy's elementwise ops
        are ~7x faster than torch's on these single-threaded 2-D compares."""
        height, width = image.shape[-2:]
        masks = np.zeros((len(sample.masks), height, width), dtype=bool)
        kept = 0
        for path in sample.masks:
            raw = _read_mask(path)
            check_same_size(image, raw, sample.image, path)
            values = raw.numpy()
            top = int(values.max()) if values.size else 0
            if top == 0:
                self._note("empty", path)
                continue
            # value > top // 2: exactly the non-zero pixels of a binary (0 / top) mask
            np.greater(values, top // 2, out=masks[kept])
            if np.count_nonzero(values) != np.count_nonzero(values == top):
                self._note("thresholded", path)
            kept += 1
        return torch.from_numpy(masks[:kept]), torch.ones(kept, dtype=torch.int64)

    def _read_id_map(self, sample: Sample,
                     image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(masks, labels, boxes) from one decode: masks and boxes come from the object pixels
        (one scatter, no pass per object), in numpy where its ops are faster than torch's."""
        ids_map = read_label(sample.instances, widen=False)
        check_same_size(image, ids_map, sample.image, sample.instances)
        height, width = ids_map.shape
        flat = ids_map.numpy().reshape(-1)
        where = np.flatnonzero(flat)
        ids, inverse = _dense_ids(flat[where])
        masks = np.zeros(len(ids) * height * width, dtype=bool)
        masks[inverse * (height * width) + where] = True  # flat: 4x faster than a 2-D index
        where_t, inverse_t = torch.from_numpy(where), torch.from_numpy(inverse)
        boxes = _pixel_boxes(inverse, where, len(ids), width)
        masks = torch.from_numpy(masks).view(-1, height, width)
        if sample.classes is None:
            return masks, torch.ones(len(ids), dtype=torch.int64), boxes
        classes = read_label(sample.classes)
        check_same_size(image, classes, sample.image, sample.classes)
        under = classes.reshape(-1)[where_t]
        return masks, self._object_classes(sample, torch.from_numpy(ids), inverse_t, under), boxes

    def _object_classes(self, sample: Sample, ids: torch.Tensor, inverse: torch.Tensor,
                        under: torch.Tensor) -> torch.Tensor:
        """The class under each object; an object on two classes, or on 0 / an unknown value, is an error."""
        pairs = torch.unique(inverse * (1 << 32) + under)
        objects, values = pairs >> 32, pairs & ((1 << 32) - 1)
        counts = torch.bincount(objects, minlength=len(ids))
        labels = torch.zeros(len(ids), dtype=torch.int64)
        labels[objects] = values
        bad = (counts != 1) | (labels < 1) | (labels >= self.num_classes)
        if bool(bad.any()):
            k = int(bad.nonzero()[0])
            seen = values[objects == k].tolist()
            raise ValueError(
                f"object {int(ids[k])} of {sample.instances} lies on class values {seen} of "
                f"{sample.classes}; "
                f"expected every pixel of an object on one class in 1..{self.num_classes - 1} "
                f"({', '.join(self.meta.classes[1:4])}{', ...' if self.num_classes > 4 else ''})")
        return labels

    def _note(self, kind: str, path: Path) -> None:
        seen = self._found[kind]
        if not seen:
            what = ("is not exactly binary: thresholded at half its maximum" if kind == "thresholded"
                    else "is empty: skipped")
            log.warning("instance_folder: %s %s (the first such mask; `segtrain data check` counts them)",
                        path, what)
        seen[str(path)] = None

    @property
    def label_problems(self) -> list[LabelProblem]:
        """The masks thresholded or skipped in the items read so far (`segtrain data check`)."""
        problems = []
        for kind, text in (("thresholded", "mask files are not exactly binary (JPEG, anti-aliased edges) and "
                                           "were thresholded at half their maximum"),
                           ("empty", "mask files are empty and were skipped")):
            files = list(self._found[kind])
            if files:
                message = f"{self.split}: {len(files)} {text}, e.g. {files[0]}"
                problems.append(LabelProblem("warning", kind, message))
        return problems


def _dense_ids(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct ids, int64 index of each value among them): a bincount for ids below
    2**20 (8/16-bit maps; ~10x faster than unique), np.unique for larger ones."""
    if not values.size or int(values.max()) >= 1 << 20:
        ids, inverse = np.unique(values, return_inverse=True)
        return ids.astype(np.int64), inverse.astype(np.int64).reshape(-1)
    ids = np.flatnonzero(np.bincount(values))
    lookup = np.zeros(int(ids[-1]) + 1, dtype=np.int64)
    lookup[ids] = np.arange(len(ids))
    return ids, lookup[values]


def _pixel_boxes(inverse: np.ndarray, where: np.ndarray, count: int, width: int) -> torch.Tensor:
    """float32 (N, 4) XYXY, x2/y2 exclusive (as `masks_to_boxes`), of object k's pixels: the
    flat positions `where` whose `inverse` is k (the smallest and largest position give the rows)."""
    xs = where % width
    boxes = np.empty((4, count), dtype=np.int64)
    last = int(where[-1]) if where.size else 0
    for row, values, start, reduce in ((0, xs, width, np.minimum), (1, where, last, np.minimum),
                                       (2, xs, -1, np.maximum), (3, where, -1, np.maximum)):
        boxes[row] = start
        reduce.at(boxes[row], inverse, values)
    boxes[1::2] //= width
    boxes[2:] += 1
    return torch.from_numpy(boxes.T.astype(np.float32))


def _read_mask(path: Path) -> torch.Tensor:
    """A per-object mask's values (H, W); a colour rendering counts by its brightest channel."""
    try:
        return read_label(path, widen=False)
    except ValueError as err:
        if "colour image" not in str(err):
            raise
        return read_image(path).amax(0)


def _largest_class(samples: list[Sample]) -> int:
    """The largest value of the class maps (threaded: one decode each)."""
    paths = [s.classes for s in samples if s.classes is not None]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return max(pool.map(lambda p: int(read_label(p).max()), paths), default=1)


# ---------------------------------------------------------------------------------- layouts
def find_samples(root: Path, split: str, layout: str, val_fraction: float | None,
                 seed: int) -> tuple[str, list[Sample]]:
    """(layout, this split's samples sorted by stem) under ROOT/{train,val} or a seeded split of one set."""
    if _is_split_folder(root / "train") and _is_split_folder(root / "val"):
        base = root / split
        layout = detect_layout(base) if layout == "auto" else layout
        return layout, list_samples(base, layout)
    if (root / "val").is_dir() and not _is_split_folder(root / "train"):
        raise ValueError(f"{root / 'val'} exists but {root / 'train'} does not; expected both split folders "
                         "or one set (no train/ val/) split by dataset.val_fraction")
    base = root / "train" if _is_split_folder(root / "train") else root
    layout = detect_layout(base) if layout == "auto" else layout
    samples = list_samples(base, layout)
    if val_fraction is None:
        raise ValueError(f"{root} holds one set (no train/ and val/ folders): set dataset.val_fraction "
                         "(e.g. 0.1) to split it")
    if len(samples) < 2:
        raise ValueError(f"{base} holds {len(samples)} image; a train/val split needs at least 2")
    count = min(max(1, round(len(samples) * float(val_fraction))), len(samples) - 1)
    chosen = set(np.random.default_rng(seed).permutation(len(samples))[:count].tolist())
    if split == "train" and is_main_process():
        log.info("instance_folder: %d train / %d val images (val_fraction %s, seed %d)",
                 len(samples) - count, count, val_fraction, seed)
    return layout, [s for i, s in enumerate(samples) if (i in chosen) == (split == "val")]


def _is_split_folder(path: Path) -> bool:
    """A train/ or val/ folder, not a per-sample folder named so (ROOT/train/images/train.png)."""
    images = path / "images"
    return path.is_dir() and not (images.is_dir() and any(p.stem == path.name for p in images.iterdir()))


def detect_layout(base: Path) -> str:
    """instances/ -> instance_map; masks/ of folders -> per_object; sample folders -> per_sample."""
    if not base.is_dir() or not any(p for p in base.iterdir() if not p.name.startswith(".")):
        raise ValueError(f"{base} is empty; expected one of the layouts\n{ALL_TREES}")
    if (base / "images").is_dir() and (base / "instances").is_dir():
        return "instance_map"
    if (base / "images").is_dir() and (base / "masks").is_dir():
        if any(p.is_dir() for p in (base / "masks").iterdir()):
            return "per_object"
        raise ValueError(f"{base / 'masks'} holds files, not one folder per image: one label map per "
                         "image is the semantic layout (dataset=folder); for instances expected one of\n"
                         f"{ALL_TREES}")
    if any((p / "images").is_dir() for p in base.iterdir() if p.is_dir()):
        return "per_sample"
    raise ValueError(f"cannot tell the layout of {base}; expected one of\n{ALL_TREES}\n"
                     "(or force one with dataset.layout=per_sample|per_object|instance_map)")


def list_samples(base: Path, layout: str) -> list[Sample]:
    """Every sample of `layout` under `base`, sorted by stem; missing or stray files are errors."""
    def fail(problem: str) -> FileNotFoundError | ValueError:
        kind = FileNotFoundError if "not found" in problem else ValueError
        return kind(f"dataset=instance_folder layout={layout}: {problem}. Expected\n  "
                    f"{TREES[layout].replace(chr(10), chr(10) + '  ')}\n(ROOT = {base})")

    def folder(path: Path) -> Path:
        if not path.is_dir():
            raise fail(f"{path} not found")
        return path

    if layout == "per_sample":
        samples = []
        for sample in sorted(p for p in folder(base).iterdir() if p.is_dir() and not p.name.startswith(".")):
            images = _by_stem(folder(sample / "images"), IMAGE_SUFFIXES, fail)
            if len(images) != 1:
                raise fail(f"{sample / 'images'} holds {len(images)} images; expected exactly one")
            if not (sample / "masks").is_dir():
                raise fail(f"image {next(iter(images.values()))} has no mask folder {sample / 'masks'}")
            masks = _by_stem(sample / "masks", MASK_SUFFIXES, fail)
            image = next(iter(images.values()))
            samples.append(Sample(sample.name, image, tuple(masks[k] for k in sorted(masks))))
        if not samples:
            raise fail(f"{base} holds no sample folders")
        return samples
    images = _by_stem(folder(base / "images"), IMAGE_SUFFIXES, fail)
    if not images:
        raise fail(f"{base / 'images'} holds no images")
    if layout == "per_object":
        masks_dir = folder(base / "masks")
        loose = sorted(p.name for p in masks_dir.iterdir() if not p.is_dir() and not p.name.startswith("."))
        if loose:
            raise fail(f"{masks_dir} holds files {', '.join(loose[:_SHOWN])}; expected one folder per "
                       "image stem")
        dirs = {p.name: p for p in masks_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
        _check_pairs(images, dirs, base / "images", masks_dir, fail)
        return [Sample(stem, images[stem], tuple(sorted(_by_stem(dirs[stem], MASK_SUFFIXES, fail).values())))
                for stem in sorted(images)]
    if layout != "instance_map":
        raise ValueError(f"dataset.layout={layout!r}; expected auto or one of {', '.join(LAYOUTS)}")
    maps = _by_stem(folder(base / "instances"), MAP_SUFFIXES, fail)
    _check_pairs(images, maps, base / "images", base / "instances", fail)
    classes = None
    if (base / "classes").is_dir():
        classes = _by_stem(base / "classes", MAP_SUFFIXES, fail)
        _check_pairs(images, classes, base / "images", base / "classes", fail)
    return [Sample(stem, images[stem], instances=maps[stem],
                   classes=None if classes is None else classes[stem]) for stem in sorted(images)]


def _check_pairs(images: dict[str, Path], others: dict[str, Any], image_dir: Path, other_dir: Path,
                 fail: Callable) -> None:
    for what, stems, there in (("images", images.keys() - others.keys(), other_dir),
                               ("entries", others.keys() - images.keys(), image_dir)):
        if stems:
            shown = ", ".join(sorted(stems)[:_SHOWN]) + (", ..." if len(stems) > _SHOWN else "")
            source = image_dir if what == "images" else other_dir
            raise fail(f"{len(stems)} {what} in {source} have no counterpart with the same stem in "
                       f"{there}: {shown}")
