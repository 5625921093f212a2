"""Cityscapes fine annotations (19 train classes, optional instances) read from leftImg8bit + gtFine."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from segtrain.data.codecs.image_io import read_image, read_label
from segtrain.data.datasets.layout import check_same_size, int64_semantic, require_root, semantic_target
from segtrain.data.datasets.panoptic import masks_to_boxes
from segtrain.data.meta import DatasetMeta

IGNORE_INDEX = 255


class Label(NamedTuple):
    name: str
    id: int
    train_id: int
    has_instances: bool
    color: tuple[int, int, int]


# cityscapesScripts' helpers/labels.py (category, categoryId and ignoreInEval left out).
LABELS = (
    Label("unlabeled", 0, 255, False, (0, 0, 0)),
    Label("ego vehicle", 1, 255, False, (0, 0, 0)),
    Label("rectification border", 2, 255, False, (0, 0, 0)),
    Label("out of roi", 3, 255, False, (0, 0, 0)),
    Label("static", 4, 255, False, (0, 0, 0)),
    Label("dynamic", 5, 255, False, (111, 74, 0)),
    Label("ground", 6, 255, False, (81, 0, 81)),
    Label("road", 7, 0, False, (128, 64, 128)),
    Label("sidewalk", 8, 1, False, (244, 35, 232)),
    Label("parking", 9, 255, False, (250, 170, 160)),
    Label("rail track", 10, 255, False, (230, 150, 140)),
    Label("building", 11, 2, False, (70, 70, 70)),
    Label("wall", 12, 3, False, (102, 102, 156)),
    Label("fence", 13, 4, False, (190, 153, 153)),
    Label("guard rail", 14, 255, False, (180, 165, 180)),
    Label("bridge", 15, 255, False, (150, 100, 100)),
    Label("tunnel", 16, 255, False, (150, 120, 90)),
    Label("pole", 17, 5, False, (153, 153, 153)),
    Label("polegroup", 18, 255, False, (153, 153, 153)),
    Label("traffic light", 19, 6, False, (250, 170, 30)),
    Label("traffic sign", 20, 7, False, (220, 220, 0)),
    Label("vegetation", 21, 8, False, (107, 142, 35)),
    Label("terrain", 22, 9, False, (152, 251, 152)),
    Label("sky", 23, 10, False, (70, 130, 180)),
    Label("person", 24, 11, True, (220, 20, 60)),
    Label("rider", 25, 12, True, (255, 0, 0)),
    Label("car", 26, 13, True, (0, 0, 142)),
    Label("truck", 27, 14, True, (0, 0, 70)),
    Label("bus", 28, 15, True, (0, 60, 100)),
    Label("caravan", 29, 255, True, (0, 0, 90)),
    Label("trailer", 30, 255, True, (0, 0, 110)),
    Label("train", 31, 16, True, (0, 80, 100)),
    Label("motorcycle", 32, 17, True, (0, 0, 230)),
    Label("bicycle", 33, 18, True, (119, 11, 32)),
    Label("license plate", -1, -1, False, (0, 0, 142)),
)
TRAIN_LABELS = tuple(sorted((lb for lb in LABELS if 0 <= lb.train_id < 255), key=lambda lb: lb.train_id))
THING_IDS = tuple(lb.train_id for lb in TRAIN_LABELS if lb.has_instances)  # 11..18
# labelIds value -> train id; -1 marks values outside the table (not a Cityscapes label map).
ID_TO_TRAIN_ID = torch.full((256,), -1, dtype=torch.int64)
for _label in LABELS:
    if _label.id >= 0:
        ID_TO_TRAIN_ID[_label.id] = _label.train_id
MAX_LABEL_ID = max(lb.id for lb in LABELS)  # 33; every id in 0..33 is in the table
# The same table as uint8 over 0..MAX_LABEL_ID, for 8-bit train-id maps.
_ID_TO_TRAIN_ID_U8 = ID_TO_TRAIN_ID[: MAX_LABEL_ID + 1].to(torch.uint8).numpy()
_LAYOUT = (
    "{root}/\n"
    "  leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png\n"
    "  gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png{instances}"
)
_IMAGE_SUFFIX, _LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"
_INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


def cityscapes_meta() -> DatasetMeta:
    """The 19 evaluated classes in train-id order with their official colours; 8 things (11..18).

    `category_ids` are the Cityscapes label ids (7 road ... 33 bicycle), which results files use.
    """
    return DatasetMeta(
        classes=[lb.name for lb in TRAIN_LABELS],
        palette=[lb.color for lb in TRAIN_LABELS],
        ignore_index=IGNORE_INDEX,
        thing_ids=list(THING_IDS),
        stuff_ids=[lb.train_id for lb in TRAIN_LABELS if not lb.has_instances],
        category_ids=[lb.id for lb in TRAIN_LABELS],
    )


class CityscapesSegmentation(Dataset):
    """Cityscapes fine annotations in the official layout (train 2,975, val 500 frames).

    Frames are `leftImg8bit/{split}/<city>/*_leftImg8bit.png` over every city folder of the split;
    labels `gtFine/{split}/<city>/*_gtFine_labelIds.png`, mapped to the 19 train ids through
    cityscapesScripts' label table (other label ids -> 255).

    Returns `(image, target)`: image `tv_tensors.Image` uint8 (3, H, W); target dict with
    `semantic` Mask int64 (H, W) in 0..18 or 255 (ignore), `image_id` int (the item index),
    `orig_size` int64 [H, W], `file_name` str ("<city>_<seq>_<frame>"). With
    `with_instances=True` also, from `*_gtFine_instanceIds.png` (values >= 1000 are instances of
    label id value // 1000; instances of classes without a train id, e.g. caravan, are left out):
    `masks` Mask bool (N, H, W), `labels` int64 (N,) = 1 + index among the 8 thing classes
    (person 1 ... bicycle 8), `boxes` BoundingBoxes XYXY float (x2/y2 exclusive), `iscrowd`
    int64 zeros (N,). `transforms(image, target)` is applied last when given.
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str = "train",
        transforms: Callable | None = None,
        with_instances: bool = False,
    ) -> None:
        self.split, self.transforms, self.with_instances = str(split), transforms, bool(with_instances)
        self.meta = cityscapes_meta()
        self.root = self._check_root(root)
        self._records = self._match_files()

    # ------------------------------------------------------------------------------ setup
    def _tree(self, root: Any) -> str:
        instances = f"\n  gtFine/{self.split}/<city>/<city>_<seq>_<frame>{_INSTANCE_SUFFIX}"
        return _LAYOUT.format(
            root=root if root is not None else "ROOT", split=self.split,
            instances=instances if self.with_instances else "",
        )

    def _check_root(self, root: str | os.PathLike | None) -> Path:
        name = type(self).__name__
        root = require_root(name, root, self._tree, "cityscapes")
        for top in ("leftImg8bit", "gtFine"):
            folder = root / top / self.split
            if not folder.is_dir():
                present = (root / top).is_dir()
                splits = sorted(p.name for p in (root / top).iterdir() if p.is_dir()) if present else []
                raise FileNotFoundError(
                    f"{name}: split folder {folder} not found (split={self.split!r}; {root / top} holds "
                    f"{', '.join(splits) or 'nothing'}); expected\n{self._tree(root)}"
                )
        return root

    def _match_files(self) -> list[tuple[str, Path, Path, Path]]:
        """(stem, image, labelIds, instanceIds) per frame, sorted by city then name."""
        name = type(self).__name__
        images = _frames(self.root / "leftImg8bit" / self.split, _IMAGE_SUFFIX)
        if not images:
            raise ValueError(
                f"{name}: no *{_IMAGE_SUFFIX} under {self.root / 'leftImg8bit' / self.split}/<city>/; "
                f"expected\n{self._tree(self.root)}"
            )
        gt_dir = self.root / "gtFine" / self.split
        suffixes = (_LABEL_SUFFIX, _INSTANCE_SUFFIX) if self.with_instances else (_LABEL_SUFFIX,)
        for suffix in suffixes:
            labels = _frames(gt_dir, suffix)
            self._check_pairs(images, labels, suffix)
        return [
            (stem, path, gt_dir / path.parent.name / f"{stem}{_LABEL_SUFFIX}",
             gt_dir / path.parent.name / f"{stem}{_INSTANCE_SUFFIX}")
            for stem, path in sorted(images.items(), key=lambda item: (item[1].parent.name, item[0]))
        ]

    def _check_pairs(self, images: dict[str, Path], labels: dict[str, Path], suffix: str) -> None:
        gt_dir = self.root / "gtFine" / self.split
        no_label = sorted(set(images) - set(labels))
        no_image = sorted(set(labels) - set(images))
        if not no_label and not no_image:
            return
        if no_label:  # name the files that should be there
            stems, what = no_label, f"without *{suffix}"
            shown_names = [str(gt_dir / images[s].parent.name / f"{s}{suffix}") for s in no_label[:5]]
        else:
            stems, what = no_image, "without an image"
            shown_names = [str(labels[s]) for s in no_image[:5]]
        shown = ", ".join(shown_names) + (", ..." if len(stems) > 5 else "")
        error = FileNotFoundError if no_label else ValueError
        raise error(
            f"{type(self).__name__}: {len(images)} images under {self.root / 'leftImg8bit' / self.split} "
            f"but {len(labels)} *{suffix} under {gt_dir}; {len(stems)} frames {what} ({shown}). "
            f"Expected every frame in both, matched by <city>/<city>_<seq>_<frame>:\n{self._tree(self.root)}"
        )

    # ------------------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        stem, image_path, label_path, instance_path = self._records[int(index)]
        image, label_ids = read_image(image_path), read_label(label_path, widen=False)
        check_same_size(image, label_ids, image_path, label_path)
        # uint8 through the transforms (nearest resize, crop and flip move 8x fewer bytes than
        # int64); the item contract's int64 is made once, from the crop.
        train_ids = label_ids_to_train_ids(label_ids, label_path)
        target = semantic_target(train_ids, int(index), stem, dtype=torch.uint8)
        if self.with_instances:
            instance_ids = read_label(instance_path)
            check_same_size(image, instance_ids, image_path, instance_path)
            target.update(instance_targets(instance_ids))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, int64_semantic(target)


def label_ids_to_train_ids(label_ids: torch.Tensor, path: str | os.PathLike = "labelIds") -> torch.Tensor:
    """Cityscapes label ids int (H, W) in 0..33 -> train ids uint8 (H, W) in 0..18 or 255."""
    if label_ids.numel():
        low, high = torch.aminmax(label_ids)
        if int(low) < 0 or int(high) > MAX_LABEL_ID:
            values = label_ids.unique()
            unknown = values[(values < 0) | (values > MAX_LABEL_ID)].tolist()[:10]
            raise ValueError(
                f"{path} holds values {unknown}; expected Cityscapes label ids 0..{MAX_LABEL_ID}"
            )
    # numpy's take of a uint8 table, indexed by the ids as they come (uint8 or int64): ~10x
    # faster than torch indexing, which gathers with int64 indices only (measured, 2048x1024).
    return torch.from_numpy(_ID_TO_TRAIN_ID_U8.take(label_ids.numpy(force=True)))


def instance_targets(instance_ids: torch.Tensor) -> dict[str, Any]:
    """`masks`, `labels`, `boxes`, `iscrowd` from an instanceIds map int (H, W).

    Values >= 1000 are label_id * 1000 + n; smaller values are plain label ids (stuff, or thing
    groups without instances) and give no instance.
    """
    height, width = instance_ids.shape[-2:]
    ids = instance_ids.unique()
    ids = ids[ids >= 1000]
    thing_label = torch.zeros(256, dtype=torch.int64)  # train id -> 1 + thing index; 0 = not a thing
    thing_label[list(THING_IDS)] = torch.arange(1, len(THING_IDS) + 1)
    train_ids = ID_TO_TRAIN_ID[(ids // 1000).clamp(max=255)]
    labels = torch.where(train_ids >= 0, thing_label[train_ids.clamp(min=0)], 0)
    ids, labels = ids[labels > 0], labels[labels > 0]
    masks = instance_ids.unsqueeze(0) == ids.view(-1, 1, 1)
    return {
        "masks": tv_tensors.Mask(masks),
        "labels": labels,
        "boxes": tv_tensors.BoundingBoxes(masks_to_boxes(masks), format="XYXY", canvas_size=(height, width)),
        "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
    }


def _frames(split_dir: Path, suffix: str) -> dict[str, Path]:
    """stem ("<city>_<seq>_<frame>") -> file, over the city folders of a split."""
    frames = {}
    for city in sorted(os.listdir(split_dir)):
        city_dir = split_dir / city
        if city_dir.is_dir():
            for name in os.listdir(city_dir):
                if name.endswith(suffix):
                    frames[name[: -len(suffix)]] = city_dir / name
    return frames
