"""ADE20K SceneParsing (ADEChallengeData2016, 150 classes) read from its official layout."""

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
from segtrain.data.meta import DatasetMeta

# The 150 classes of the SceneParsing benchmark (objectInfo150), as MMSegmentation names them.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
    "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box",
    "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet",
    "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle",
    "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
)
# MMSegmentation's ADE20K palette (the benchmark ships none).
ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0), (0, 82, 255),
    (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0),
    (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82), (0, 10, 255),
    (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0),
    (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160),
    (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163), (255, 204, 0), (255, 0, 143),
    (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255), (255, 0, 122), (255, 245, 0),
    (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255),
    (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255), (71, 0, 255),
    (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
)
IGNORE_INDEX = 255
# Config-style split names -> the folder names the release uses.
_SPLIT_DIRS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}
_LAYOUT = (
    "{root}/                 (ADEChallengeData2016 itself, or the folder holding it)\n"
    "  ADEChallengeData2016/\n"
    "    images/{folder}/ADE_{tag}_<n>.jpg\n"
    "    annotations/{folder}/ADE_{tag}_<n>.png"
)


def ade20k_meta() -> DatasetMeta:
    """The 150 SceneParsing classes (train id k = annotation value k + 1) with MMSegmentation's palette."""
    return DatasetMeta(classes=list(ADE20K_CLASSES), palette=list(ADE20K_PALETTE), ignore_index=IGNORE_INDEX)


class ADE20K(Dataset):
    """ADE20K SceneParsing (train 20,210, val 2,000 images) in the `ADEChallengeData2016` layout.

    `split` is "train"/"training" or "val"/"validation". Images `images/<folder>/*.jpg` pair
    with grayscale annotations `annotations/<folder>/*.png` by stem. An annotation value 0
    ("other") becomes 255 (ignore) and k in 1..150 becomes k - 1 (MMSegmentation's
    reduce_zero_label).

    Returns `(image, target)`: image `tv_tensors.Image` uint8 (3, H, W); target dict with
    `semantic` Mask int64 (H, W) in 0..149 or 255 (ignore), `image_id` int (the item index),
    `orig_size` int64 [H, W], `file_name` str (e.g. "ADE_val_00000001"). `transforms(image,
    target)` is applied last when given.
    """

    def __init__(
        self, root: str | os.PathLike | None, split: str = "train", transforms: Callable | None = None
    ) -> None:
        self.split, self.transforms = str(split), transforms
        self.meta = ade20k_meta()
        if self.split not in _SPLIT_DIRS:
            raise ValueError(
                f"ADE20K(split={self.split!r}): expected one of {sorted(_SPLIT_DIRS)} (the release has "
                "training and validation annotations only)"
            )
        self.folder = _SPLIT_DIRS[self.split]
        self.data_dir = self._find_data_dir(root)
        self._records = self._match_files()

    def _tree(self, root: Any) -> str:
        tag = "train" if self.folder == "training" else "val"
        return _LAYOUT.format(root=root if root is not None else "ROOT", folder=self.folder, tag=tag)

    def _find_data_dir(self, root: str | os.PathLike | None) -> Path:
        root = require_root("ADE20K", root, self._tree, "data")
        data_dir = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
        for top in ("images", "annotations"):
            if not (data_dir / top / self.folder).is_dir():
                raise FileNotFoundError(
                    f"ADE20K: split folder {data_dir / top / self.folder} not found (split={self.split!r}); "
                    f"expected\n{self._tree(root)}"
                )
        return data_dir

    def _match_files(self) -> list[tuple[str, Path, Path]]:
        image_dir = self.data_dir / "images" / self.folder
        ann_dir = self.data_dir / "annotations" / self.folder
        images = {n[:-4] for n in os.listdir(image_dir) if n.endswith(".jpg")}
        anns = {n[:-4] for n in os.listdir(ann_dir) if n.endswith(".png")}
        if not images:
            raise ValueError(f"ADE20K: no *.jpg in {image_dir}; expected\n{self._tree(self.data_dir)}")
        no_ann, no_image = sorted(images - anns), sorted(anns - images)
        if no_ann or no_image:
            stems = no_ann or no_image
            what = f"without a .png in {ann_dir}" if no_ann else "without an image"
            shown = ", ".join(stems[:5]) + (", ..." if len(stems) > 5 else "")
            raise (FileNotFoundError if no_ann else ValueError)(
                f"ADE20K: {len(images)} images in {image_dir} but {len(anns)} annotations in {ann_dir}; "
                f"{len(stems)} stems {what} ({shown}). Expected pairs matched by stem:\n"
                f"{self._tree(self.data_dir)}"
            )
        return [(stem, image_dir / f"{stem}.jpg", ann_dir / f"{stem}.png") for stem in sorted(images)]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        stem, image_path, label_path = self._records[int(index)]
        image, label = read_image(image_path), read_label(label_path)
        check_same_size(image, label, image_path, label_path)
        target = semantic_target(reduce_zero_label(label, label_path), int(index), stem)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def reduce_zero_label(label: torch.Tensor, path: str | os.PathLike = "annotation") -> torch.Tensor:
    """ADE annotation int (H, W) in 0..150 -> train ids int64: 0 -> 255 (ignore), k -> k - 1."""
    if label.numel() and int(label.max()) > len(ADE20K_CLASSES):
        raise ValueError(
            f"{path} holds values up to {int(label.max())}; expected 0 (other) .. {len(ADE20K_CLASSES)}"
        )
    label = label.to(torch.int64) - 1
    return label.masked_fill_(label < 0, IGNORE_INDEX)
