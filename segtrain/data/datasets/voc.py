"""PASCAL VOC 2012 semantic segmentation, and its SBD-augmented training set, read from VOCdevkit."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from segtrain.data.codecs.image_io import read_image, read_label
from segtrain.data.datasets.layout import check_same_size, require_root, semantic_target
from segtrain.data.meta import DatasetMeta, default_palette

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
IGNORE_INDEX = 255
_LAYOUT = (
    "{root}/                          (the folder holding VOCdevkit, or VOCdevkit/VOC2012 itself)\n"
    "  VOCdevkit/VOC2012/\n"
    "    JPEGImages/<name>.jpg\n"
    "{ann_lines}"
    "    ImageSets/Segmentation/{list_file}"
)


def voc_meta() -> DatasetMeta:
    """VOC's 21 classes (0 = background) with VOC's palette; 255 = ignore (object borders)."""
    return DatasetMeta(
        classes=list(VOC_CLASSES), palette=default_palette(len(VOC_CLASSES)), ignore_index=IGNORE_INDEX
    )


class VOCSegmentation(Dataset):
    """PASCAL VOC 2012 semantic segmentation in its official layout.

    `root` is the folder holding `VOCdevkit/`, `VOCdevkit/` itself, or `VOCdevkit/VOC2012/`.
    Items are the names listed in `ImageSets/Segmentation/{split}.txt` (train 1,464, val 1,449,
    trainval 2,913), read from `JPEGImages/<name>.jpg` and `SegmentationClass/<name>.png`
    (palette PNGs: the palette indices 0..20 are the classes, 255 the void border).

    Returns `(image, target)`: image `tv_tensors.Image` uint8 (3, H, W); target dict with
    `semantic` Mask int64 (H, W) in 0..20 or 255 (ignore), `image_id` int (the item index),
    `orig_size` int64 [H, W], `file_name` str (the image's stem). `transforms(image, target)`
    is applied last when given. The list and every listed file are checked at construction.
    """

    ann_dirs: tuple[str, ...] = ("SegmentationClass",)
    # Further folders every listed name must have a PNG in (VOCInstanceSegmentation's
    # SegmentationObject); their paths follow the class mask's in each record.
    extra_ann_dirs: tuple[str, ...] = ()

    def __init__(
        self, root: str | os.PathLike | None, split: str = "train", transforms: Callable | None = None
    ) -> None:
        self.split, self.transforms = str(split), transforms
        self.meta = voc_meta()
        self.voc_dir = self._find_voc_dir(root)
        list_files = self._list_files()
        self.stems = _read_lists(list_files)
        if not self.stems:
            raise ValueError(f"{type(self).__name__}: {', '.join(map(str, list_files))} lists no images")
        self._records = self._match_files(list_files)

    # ------------------------------------------------------------------------------ setup
    def _tree(self, root: Any) -> str:
        ann_lines = "".join(
            f"    {folder}/<name>.png\n" for folder in (" or ".join(self.ann_dirs), *self.extra_ann_dirs)
        )
        return _LAYOUT.format(
            root=root if root is not None else "ROOT", ann_lines=ann_lines, list_file=f"{self.split}.txt"
        )

    def _find_voc_dir(self, root: str | os.PathLike | None) -> Path:
        name = type(self).__name__
        root = require_root(name, root, self._tree, "data")
        for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
            if (candidate / "JPEGImages").is_dir():
                return candidate
        raise FileNotFoundError(
            f"{name}: no JPEGImages/ folder in {root}, {root / 'VOC2012'} or "
            f"{root / 'VOCdevkit' / 'VOC2012'}; expected\n{self._tree(root)}"
        )

    def _list_files(self) -> list[Path]:
        path = self.voc_dir / "ImageSets" / "Segmentation" / f"{self.split}.txt"
        if not path.is_file():
            raise FileNotFoundError(
                f"{type(self).__name__}: split list {path} not found (split={self.split!r}); the folder "
                f"holds {_available(path.parent, '.txt')}. Expected\n{self._tree(self.voc_dir)}"
            )
        return [path]

    def _match_files(self, list_files: list[Path]) -> list[tuple[Path | str, ...]]:
        """(stem, image path, label path, *extra_ann_dirs paths) per listed name; a missing file
        is reported here."""
        image_dir = self.voc_dir / "JPEGImages"
        images = _stems(image_dir, ".jpg")
        missing = [s for s in self.stems if s not in images]
        if missing:
            raise FileNotFoundError(self._missing("image", missing, image_dir, ".jpg", list_files))
        # Earlier folders win: VOC's own masks (finer, with void borders) over SBD's.
        ann_dirs = [self.voc_dir / d for d in self.ann_dirs]
        ann_stems = [_stems(d, ".png") for d in ann_dirs]
        records, missing = [], []
        for stem in self.stems:
            ann_dir = next((d for d, s in zip(ann_dirs, ann_stems) if stem in s), None)
            if ann_dir is None:
                missing.append(stem)
            else:
                records.append((stem, image_dir / f"{stem}.jpg", ann_dir / f"{stem}.png"))
        if missing:
            where = " or ".join(str(d) for d in ann_dirs)
            raise FileNotFoundError(self._missing("mask", missing, where, ".png", list_files))
        for folder in (self.voc_dir / d for d in self.extra_ann_dirs):
            found = _stems(folder, ".png")
            missing = [s for s in self.stems if s not in found]
            if missing:
                message = self._missing(f"{folder.name} mask", missing, folder, ".png", list_files)
                raise FileNotFoundError(message)
            records = [(*record, folder / f"{record[0]}.png") for record in records]
        return records

    def _missing(self, what: str, stems: list[str], where: Any, ext: str, lists: list[Path]) -> str:
        shown = ", ".join(f"{s}{ext}" for s in stems[:5]) + (", ..." if len(stems) > 5 else "")
        return (
            f"{type(self).__name__}: {len(stems)} of the {len(self.stems)} names listed in "
            f"{', '.join(map(str, lists))} have no {what} in {where} ({shown}); expected\n"
            f"{self._tree(self.voc_dir)}"
        )

    # ------------------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        stem, image_path, label_path = self._records[int(index)][:3]
        image, label = read_image(image_path), read_label(label_path)
        check_same_size(image, label, image_path, label_path)
        check_class_values(label, label_path)
        target = semantic_target(label, int(index), stem)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class VOCAugSegmentation(VOCSegmentation):
    """VOC 2012 + SBD (10,582 training images), as MMSegmentation's `voc_aug.py` prepares it.

    split="train" reads the first list found in `ImageSets/Segmentation/`: `trainaug.txt`
    (MMSegmentation: VOC train + SBD - VOC val), `train_aug.txt` (DeepLab's release; lines may be
    "/JPEGImages/x.jpg /SegmentationClassAug/x.png"), or else `train.txt` + `aug.txt` together
    (MMSegmentation's two-part config). Masks come from `SegmentationClass/` when VOC annotates
    the image, else `SegmentationClassAug/` (grayscale index PNGs), as MMSegmentation's
    concatenated config does. Any other split (val) is plain VOC's, as in `VOCSegmentation`.
    """

    train_lists = (("trainaug.txt",), ("train_aug.txt",), ("train.txt", "aug.txt"))

    def __init__(
        self, root: str | os.PathLike | None, split: str = "train", transforms: Callable | None = None
    ) -> None:
        if str(split) == "train":
            self.ann_dirs = ("SegmentationClass", "SegmentationClassAug")
        super().__init__(root, split, transforms)

    def _tree(self, root: Any) -> str:
        tree = super()._tree(root)
        if self.split != "train":
            return tree
        return tree.replace("train.txt", "trainaug.txt (or train_aug.txt, or train.txt + aug.txt)")

    def _list_files(self) -> list[Path]:
        if self.split != "train":
            return super()._list_files()
        folder = self.voc_dir / "ImageSets" / "Segmentation"
        for names in self.train_lists:
            if all((folder / n).is_file() for n in names):
                return [folder / n for n in names]
        raise FileNotFoundError(
            f"{type(self).__name__}: no augmented training list in {folder} (it holds "
            f"{_available(folder, '.txt')}); expected\n{self._tree(self.voc_dir)}\nMake it with "
            "MMSegmentation's tools/dataset_converters/voc_aug.py"
        )


def check_class_values(label: torch.Tensor, path: Path) -> None:
    """ValueError naming `path` when the int64 (H, W) label map holds a value that is neither a
    VOC class (0..20) nor 255 (void)."""
    bad = (label > len(VOC_CLASSES) - 1) & (label != IGNORE_INDEX)
    if bad.any():
        raise ValueError(
            f"{path} holds label values {sorted(label[bad].unique().tolist())[:10]}; expected "
            f"0..{len(VOC_CLASSES) - 1} (palette indices, not colours) or {IGNORE_INDEX} (void)"
        )


def _read_lists(paths: list[Path]) -> list[str]:
    """Stems listed one a line, first token only (DeepLab's lists pair image and mask paths)."""
    stems: dict[str, None] = {}  # ordered and without repeats: train.txt and aug.txt may overlap
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                stems[Path(line.split()[0]).stem] = None
    return list(stems)


def _stems(folder: Path, ext: str) -> set[str]:
    # One directory listing instead of a stat per listed name (10,582 names for voc_aug).
    try:
        return {name[: -len(ext)] for name in os.listdir(folder) if name.endswith(ext)}
    except FileNotFoundError:
        return set()


def _available(folder: Path, ext: str) -> str:
    names = sorted(n for n in os.listdir(folder) if n.endswith(ext)) if folder.is_dir() else []
    return ", ".join(names) if names else "none"
