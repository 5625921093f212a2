"""Panoptic segmentation datasets (COCO panoptic, Cityscapes panoptic) and the panoptic target contract."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from segtrain.data.codecs.image_io import read_image
from segtrain.data.meta import DatasetMeta, default_palette

Tensor = torch.Tensor


def rgb_to_id(rgb: Tensor) -> Tensor:
    """COCO panoptic PNG colours uint8 (3, H, W) -> segment ids int64 (H, W): R + 256 G + 256^2 B."""
    rgb = rgb.to(torch.int64)
    return rgb[0] + (rgb[1] << 8) + (rgb[2] << 16)


def id_to_rgb(ids: Tensor) -> Tensor:
    """Segment ids int (H, W) in [0, 256^3) -> uint8 (3, H, W); inverse of `rgb_to_id`."""
    ids = ids.to(torch.int64)
    return torch.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255]).to(torch.uint8)


class PanopticMap(tv_tensors.Mask):
    """int64 (H, W) panoptic segment ids, 0 = VOID.

    A `Mask` (so every v2 kernel resizes it with nearest, flips and crops it like a label map)
    whose own type tells padding to fill it with 0 (VOID): 255 would be a segment id.
    """


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Bool (N, H, W), each non-empty -> float (N, 4) XYXY with exclusive x2, y2.

    A mask spanning columns 3..7 has x1=3, x2=8, so x2 - x1 is COCO's bbox width.
    """
    if not len(masks):
        return torch.zeros(0, 4)
    # uint8 max, not bool any: ~12x faster over a middle dim (dense images with hundreds of masks).
    flags = masks.view(torch.uint8) if masks.dtype == torch.bool else (masks != 0).view(torch.uint8)
    cols, rows = flags.amax(1), flags.amax(2)
    x1, y1 = cols.int().argmax(1), rows.int().argmax(1)
    x2 = masks.shape[2] - cols.flip(1).int().argmax(1)
    y2 = masks.shape[1] - rows.flip(1).int().argmax(1)
    return torch.stack([x1, y1, x2, y2], 1).float()


def panoptic_targets(
    panoptic: Tensor,
    ids: Tensor,
    classes: Tensor,
    iscrowd: Tensor,
    meta: DatasetMeta,
    source: str = "panoptic map",
) -> dict[str, Any]:
    """The panoptic target dict of one image, semantic and instance targets derived from it.

    panoptic: int64 (H, W) segment ids, 0 = VOID. ids, classes, iscrowd: int64 (S,) per segment
    (classes are contiguous ids into `meta.classes`). Every non-zero id of the map must be listed
    and every listed id must cover a pixel; `source` names the data in the ValueError otherwise.

    Returns `panoptic` Mask int64 (H, W); `segments` {"ids", "classes", "iscrowd"} int64 (S,);
    `semantic` Mask int64 (H, W) of contiguous ids, `meta.ignore_index` on VOID; and for the
    non-crowd thing segments in listed order `masks` Mask bool (N, H, W) (= panoptic == id),
    `labels` int64 (N,) = 1 + index of the class in `meta.thing_ids`, `boxes` BoundingBoxes XYXY
    (exclusive x2/y2), `iscrowd` int64 zeros (N,).
    """
    height, width = panoptic.shape
    ids, classes, iscrowd = (
        torch.as_tensor(t, dtype=torch.int64).reshape(-1) for t in (ids, classes, iscrowd)
    )
    index = segment_index(panoptic, ids, source)
    num_classes = meta.num_classes
    if len(classes) and not (int(classes.min()) >= 0 and int(classes.max()) < num_classes):
        raise ValueError(f"{source}: segment classes {classes.tolist()} fall outside [0, {num_classes})")
    # index -1 (VOID) picks the appended last entry.
    semantic = torch.cat([classes, torch.tensor([meta.ignore_index])])[index]
    thing_label = torch.zeros(num_classes, dtype=torch.int64)
    thing_label[meta.thing_ids] = torch.arange(1, len(meta.thing_ids) + 1)
    chosen = ((thing_label[classes] > 0) & (iscrowd == 0)).nonzero().view(-1)
    masks = index.unsqueeze(0) == chosen.view(-1, 1, 1)
    return {
        "panoptic": PanopticMap(panoptic.to(torch.int64)),  # pads with 0 (VOID), not ignore_index
        "segments": {"ids": ids, "classes": classes, "iscrowd": iscrowd},
        "semantic": tv_tensors.Mask(semantic),
        "masks": tv_tensors.Mask(masks),
        "labels": thing_label[classes[chosen]],
        "boxes": tv_tensors.BoundingBoxes(masks_to_boxes(masks), format="XYXY", canvas_size=(height, width)),
        "iscrowd": torch.zeros(len(chosen), dtype=torch.int64),
    }


def segment_index(panoptic: Tensor, ids: Tensor, source: str = "panoptic map") -> Tensor:
    """int64 (H, W): position in `ids` of each pixel's segment, -1 for VOID (id 0).

    ValueError (naming `source`) when the map holds an unlisted id or a listed id covers no pixel.
    """
    if len(torch.unique(ids)) != len(ids) or bool((ids <= 0).any()):
        raise ValueError(f"{source}: segment ids {ids.tolist()} repeat or are <= 0; expected unique ids > 0")
    order = ids.argsort()
    sorted_ids = torch.cat([ids[order], torch.zeros(1, dtype=ids.dtype)])  # a sentinel: never empty
    pos = torch.searchsorted(sorted_ids[:-1], panoptic)
    found = (sorted_ids[pos] == panoptic) & (panoptic != 0)
    unknown = ~found & (panoptic != 0)
    if bool(unknown.any()):
        raise ValueError(
            f"{source}: segment ids {torch.unique(panoptic[unknown]).tolist()[:10]} occur in the map but "
            "not in its segments_info; expected every non-zero id listed (0 = VOID)"
        )
    index = torch.where(found, torch.cat([order, order.new_zeros(1)])[pos], -1)
    counts = torch.bincount(index[found], minlength=len(ids))
    if bool((counts == 0).any()):
        raise ValueError(
            f"{source}: segments {ids[counts == 0].tolist()[:10]} are listed in segments_info but cover no "
            "pixel of the map; expected each listed id to occur in the PNG"
        )
    return index


class COCOPanopticDataset(Dataset):
    """COCO panoptic: a panoptic JSON, its PNG folder and the images, as the official release lays them out.

    Layout (defaults; `ann_file`, `png_dir`, `img_dir` override them, relative to `root` when given):
        ROOT/annotations/panoptic_{split}2017.json
        ROOT/annotations/panoptic_{split}2017/*.png
        ROOT/{split}2017/*.jpg

    Items follow `panoptic_targets` (panoptic, segments, semantic, masks, labels, boxes, iscrowd)
    plus `image_id` (the JSON's id), `orig_size` int64 [H, W] and `file_name` (the PNG's stem);
    image `tv_tensors.Image` uint8 (3, H, W). `transforms(image, target)` is applied last.

    Contiguous ids are the JSON's categories sorted by id (COCO: 133, 80 things); `meta.category_ids`
    maps back. One item per annotation (images without one have no ground truth and are left
    out). `num_classes`, when given, must equal the number of categories (no background class:
    unlabeled pixels are VOID). `json_image_ids[i]` is item i's image id as the JSON writes it.
    """

    default_ann_file = "annotations/panoptic_{split}2017.json"
    default_png_dir = "annotations/panoptic_{split}2017"
    default_img_dir = "{split}2017"
    layout = (
        "{root}/\n  annotations/panoptic_{split}2017.json\n  annotations/panoptic_{split}2017/*.png\n"
        "  {split}2017/*.jpg"
    )

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        ann_file: str | os.PathLike | None = None,
        png_dir: str | os.PathLike | None = None,
        img_dir: str | os.PathLike | None = None,
        num_classes: int | None = None,
        transforms: Callable | None = None,
    ) -> None:
        self.split, self.transforms = str(split), transforms
        self.gt_json, self.png_dir, self.img_dir = self._resolve_paths(root, ann_file, png_dir, img_dir)
        data = _load_panoptic_json(self.gt_json)
        self.meta = self._build_meta(data["categories"], num_classes)
        self._index(data)
        if len(self):
            self._check_first_item()

    # ------------------------------------------------------------------------------ setup
    def _resolve_paths(self, root: Any, ann_file: Any, png_dir: Any, img_dir: Any) -> tuple[Path, Path, Path]:
        name = type(self).__name__
        tree = self.layout.format(root=root if root is not None else "ROOT", split=self.split)
        given = {"ann_file": ann_file, "png_dir": png_dir, "img_dir": img_dir}
        if root is None and any(value is None for value in given.values()):
            raise ValueError(
                f"{name}: root is not set; pass dataset.root=/path/to/data holding\n{tree}\n"
                "or give all of ann_file, png_dir and img_dir"
            )
        base = Path(root) if root is not None else None
        if base is not None and not base.is_dir():
            raise FileNotFoundError(f"{name}: root {base} is not a directory; expected\n{tree}")
        defaults = {"ann_file": self.default_ann_file, "png_dir": self.default_png_dir,
                    "img_dir": self.default_img_dir}
        paths = {}
        for key, value in given.items():
            path = Path(value if value is not None else defaults[key].format(split=self.split))
            paths[key] = base / path if base is not None else path  # an absolute path stays as it is
            exists = paths[key].is_file() if key == "ann_file" else paths[key].is_dir()
            if not exists:
                what = {"ann_file": "annotation file", "png_dir": "panoptic PNG folder",
                        "img_dir": "image folder"}[key]
                expected = f"{key}={value} to exist" if value is not None else f"the layout\n{tree}"
                raise FileNotFoundError(f"{name}: {what} {paths[key]} not found; expected {expected}")
        return paths["ann_file"], paths["png_dir"], paths["img_dir"]

    def _build_meta(self, categories: list[dict], num_classes: int | None) -> DatasetMeta:
        try:
            categories = sorted(categories, key=lambda c: int(c["id"]))
            ids = [int(c["id"]) for c in categories]
            names = [str(c["name"]) for c in categories]
            isthing = [bool(c["isthing"]) for c in categories]
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{self.gt_json}: a category lacks 'id', 'name' or 'isthing'; expected COCO panoptic "
                "categories"
            ) from None
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"{self.gt_json}: category ids {ids} are empty or repeat; expected unique ids")
        if num_classes is not None and int(num_classes) != len(ids):
            raise ValueError(
                f"num_classes={num_classes} but {self.gt_json} has {len(ids)} categories; pass "
                f"num_classes={len(ids)} (panoptic datasets have no background class: VOID is ignored)"
            )
        palette = default_palette(len(ids))
        colours = [c.get("color") for c in categories]
        if all(isinstance(c, (list, tuple)) and len(c) == 3 for c in colours):
            palette = [tuple(int(v) for v in c) for c in colours]
        self._contiguous = {cat_id: k for k, cat_id in enumerate(ids)}
        return DatasetMeta(
            classes=names,
            palette=palette,
            thing_ids=[k for k, thing in enumerate(isthing) if thing],
            stuff_ids=[k for k, thing in enumerate(isthing) if not thing],
            category_ids=ids,
        )

    def _index(self, data: dict) -> None:
        """Flat arrays (no per-item Python objects: forked loader workers share them unchanged)."""
        images = {image["id"]: image for image in data["images"]}
        annotations = sorted(data["annotations"], key=lambda a: _sort_key(a.get("image_id")))
        json_ids, img_files, png_files, sizes, counts = [], [], [], [], []
        seg_ids, seg_classes, seg_crowd = [], [], []
        for ann in annotations:
            image = images.get(ann.get("image_id"))
            if image is None or "file_name" not in ann or "segments_info" not in ann:
                raise ValueError(
                    f"{self.gt_json}: annotation for image id {ann.get('image_id')!r} has no matching image "
                    "entry, 'file_name' or 'segments_info'; expected the COCO panoptic format"
                )
            json_ids.append(image["id"])
            img_files.append(str(self._image_path(image)))
            png_files.append(str(self.png_dir / ann["file_name"]))
            sizes.append((int(image["height"]), int(image["width"])))
            counts.append(len(ann["segments_info"]))
            for seg in ann["segments_info"]:
                if seg.get("category_id") not in self._contiguous:
                    raise KeyError(
                        f"{self.gt_json}: segment {seg.get('id')} of image {image['id']!r} has category_id "
                        f"{seg.get('category_id')}, not among the JSON's categories {list(self._contiguous)}"
                    )
                seg_ids.append(int(seg["id"]))
                seg_classes.append(self._contiguous[seg["category_id"]])
                seg_crowd.append(int(seg.get("iscrowd", 0)))
        self.json_image_ids = json_ids
        self._img_files = np.array(img_files, dtype=str)
        self._png_files = np.array(png_files, dtype=str)
        self._sizes = np.array(sizes, dtype=np.int64).reshape(-1, 2)
        self._ends = np.cumsum(counts, dtype=np.int64)
        self._segments = np.array([seg_ids, seg_classes, seg_crowd], dtype=np.int64).reshape(3, -1)

    def _image_path(self, image: dict) -> Path:
        return self.img_dir / image["file_name"]

    def _item_id(self, index: int) -> int:
        return int(self.json_image_ids[index])

    def _check_first_item(self) -> None:
        # A wrong img_dir or png_dir shows up here, before any model is built.
        for path, what in ((self._img_files[0], "image"), (self._png_files[0], "panoptic PNG")):
            if not os.path.isfile(path):
                raise FileNotFoundError(self._missing(0, str(path), what))

    def _missing(self, index: int, path: str, what: str) -> str:
        folder = self.img_dir if what == "image" else self.png_dir
        return (
            f"{what} file {path} not found (image id {self.json_image_ids[index]!r}, listed in "
            f"{self.gt_json}); expected every {what} of the JSON under {folder}"
        )

    def image_categories(self) -> list[list[int]]:
        """Each item's contiguous classes (things and stuff, sorted, once each) from the JSON's
        segments_info: no PNG is read. For `data.sampler=repeat_factor`."""
        parts = np.split(self._segments[1], self._ends[:-1]) if len(self) else []
        return [sorted(set(part.tolist())) for part in parts]

    # ------------------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside [0, {len(self)})")
        height, width = (int(v) for v in self._sizes[index])
        image = self._read(index, str(self._img_files[index]), "image", height, width)
        png = str(self._png_files[index])
        panoptic = rgb_to_id(self._read(index, png, "panoptic PNG", height, width))
        start = int(self._ends[index - 1]) if index else 0
        ids, classes, iscrowd = torch.from_numpy(self._segments[:, start : int(self._ends[index])].copy())
        source = f"{png} (image id {self.json_image_ids[index]!r} in {self.gt_json})"
        target = panoptic_targets(panoptic, ids, classes, iscrowd, self.meta, source)
        target["image_id"] = self._item_id(index)
        target["orig_size"] = torch.tensor([height, width], dtype=torch.int64)
        target["file_name"] = Path(png).stem
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _read(self, index: int, path: str, what: str, height: int, width: int) -> tv_tensors.Image:
        try:
            pixels = read_image(path)
        except FileNotFoundError:
            raise FileNotFoundError(self._missing(index, path, what)) from None
        if tuple(pixels.shape[-2:]) != (height, width):
            raise ValueError(
                f"{path} is {tuple(pixels.shape[-2:])} (H, W) but {self.gt_json} says ({height}, {width}) "
                f"for image id {self.json_image_ids[index]!r}"
            )
        return pixels


class CityscapesPanopticDataset(COCOPanopticDataset):
    """Cityscapes panoptic as cityscapesScripts' `createPanopticImgs.py` writes it into gtFine/.

    Layout (defaults; overridable as in `COCOPanopticDataset`):
        ROOT/gtFine/cityscapes_panoptic_{split}.json
        ROOT/gtFine/cityscapes_panoptic_{split}/<city>_<seq>_<frame>_gtFine_panoptic.png
        ROOT/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png

    The JSON's image entries name the image without its city folder (`file_name`
    "frankfurt_000000_000294_leftImg8bit.png", `id` "frankfurt_000000_000294"); the city is the
    name's first part. Its 19 categories carry the Cityscapes label ids (7 road ... 33 bicycle;
    sorted, they give the train-id order), 8 of them things; `--use-train-id` JSONs (ids 0..18)
    load the same way through `ann_file`/`png_dir`. Image ids there are strings, so `image_id`
    is the item's index; `json_image_ids[image_id]` and `file_name` name the frame.
    """

    default_ann_file = "gtFine/cityscapes_panoptic_{split}.json"
    default_png_dir = "gtFine/cityscapes_panoptic_{split}"
    default_img_dir = "leftImg8bit/{split}"
    layout = (
        "{root}/\n  gtFine/cityscapes_panoptic_{split}.json\n"
        "  gtFine/cityscapes_panoptic_{split}/*_panoptic.png\n"
        "  leftImg8bit/{split}/<city>/*_leftImg8bit.png\n(made by cityscapesScripts' createPanopticImgs.py)"
    )

    def _image_path(self, image: dict) -> Path:
        name = str(image["file_name"])
        return self.img_dir / name.split("_", 1)[0] / name

    def _item_id(self, index: int) -> int:
        return index


def _sort_key(image_id: Any) -> tuple[int, Any]:
    # Ints (COCO) and strings (Cityscapes) sort apart, so a mixed JSON still orders.
    return (0, image_id) if isinstance(image_id, int) else (1, str(image_id))


def _load_panoptic_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); expected a COCO panoptic annotation file"
        ) from err
    keys = ("images", "annotations", "categories")
    missing = [k for k in keys if k not in data] if isinstance(data, dict) else []
    if not isinstance(data, dict) or missing:
        raise ValueError(
            f"{path} lacks {missing or 'a top-level object'}; expected a COCO panoptic JSON with 'images', "
            "'annotations' (file_name, segments_info) and 'categories' (id, name, isthing)"
        )
    return data
