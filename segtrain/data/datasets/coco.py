"""COCO-format instance segmentation datasets: COCO 2017, LVIS v1 over COCO images, custom JSONs."""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from segtrain.data.codecs.coco_masks import decode_masks
from segtrain.data.codecs.image_io import read_image
from segtrain.data.meta import DatasetMeta, default_palette

log = logging.getLogger(__name__)

# One image's annotations after cleaning: boxes float32 (N, 4) XYXY, labels int64 (N,),
# iscrowd int64 (N,), and per annotation its polygon parts (list of flat [x0, y0, x1, ...]) or
# its RLE dict (counts a list = uncompressed, str/bytes = compressed).
_Record = tuple[int, str, int, int, np.ndarray, np.ndarray, np.ndarray, list[Any]]


class COCOInstanceDataset(Dataset):
    """Instance segmentation from a COCO-format JSON and its image folder.

    Layout (defaults; `ann_file` and `img_dir` override them, relative to `root` when given):
        ROOT/annotations/instances_{split}2017.json
        ROOT/{split}2017/*.jpg

    Returns `(image, target)`: image `tv_tensors.Image` uint8 (3, H, W); target dict with
    `boxes` BoundingBoxes XYXY float32 (N, 4) in pixels (COCO's [x, y, w, h] clipped to the
    image), `masks` Mask bool (N, H, W), `labels` int64 (N,) contiguous in [1, K], `iscrowd`
    int64 (N,), `image_id` (the JSON's image id, int), `orig_size` int64 [H, W].
    `transforms(image, target)` is applied last when given.

    Category ids: the JSON's categories sorted by id become contiguous labels 1..K, and
    `meta.category_ids[k]` is the JSON id of label k (`meta.category_id(k)` /
    `meta.contiguous_id(id)` map both ways). `meta.category_ids[0]` (background) is 0, which
    COCO and LVIS never use as a category id; for a JSON that does use 0 it is the smallest
    id minus 1. Either way it is a placeholder that never appears in a results file.

    `train=True` (default: split == "train") builds training targets: crowd annotations are
    left out, and images left without annotations are skipped (`filter_empty`, default
    `train`). Otherwise every image is kept, crowd regions included with iscrowd=1 (the
    evaluator reads `gt_json` itself). In both modes, polygon parts with fewer than 3 points
    or zero area are dropped, and annotations with no polygon left or with a zero-area box are
    skipped; the counts go into one warning.

    `num_classes`, when given, must equal K + 1 (a guard against a config / JSON mismatch).
    """

    default_ann_file = "annotations/instances_{split}2017.json"
    default_img_dir = "{split}2017"
    layout = "{root}/\n  annotations/instances_{split}2017.json\n  {split}2017/*.jpg"

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        ann_file: str | os.PathLike | None = None,
        img_dir: str | os.PathLike | None = None,
        train: bool | None = None,
        filter_empty: bool | None = None,
        num_classes: int | None = None,
        transforms: Callable | None = None,
    ) -> None:
        self.split = str(split)
        self.train = self.split == "train" if train is None else bool(train)
        self.filter_empty = self.train if filter_empty is None else bool(filter_empty)
        self.transforms = transforms
        self.gt_json, self.img_dir = self._resolve_paths(root, ann_file, img_dir)
        # Millions of new objects, none cyclic: the collector's passes would cost a third.
        with _gc_paused():
            data = _load_json(self.gt_json)
            self.meta = self._build_meta(data["categories"], num_classes)
            records = self._index(data)
            self.image_ids = [record[0] for record in records]
            # Labels of all images in one array (a few bytes each): image_categories without
            # unpickling a record or decoding a mask.
            self._label_ends = np.cumsum([len(record[5]) for record in records], dtype=np.int64)
            self._labels = np.concatenate([record[5] for record in records] or [np.zeros(0, np.int64)])
            self._records = _PackedList(records)
            del data, records
        if len(self._records):
            self._check_first_image()

    # ------------------------------------------------------------------------------ setup
    def _resolve_paths(
        self, root: str | os.PathLike | None, ann_file: Any, img_dir: Any
    ) -> tuple[Path, Path]:
        name = type(self).__name__
        tree = self.layout.format(root=root if root is not None else "ROOT", split=self.split)
        if root is None and (ann_file is None or img_dir is None):
            raise ValueError(
                f"{name}: root is not set; pass dataset.root=/path/to/data holding\n{tree}\n"
                "or give both ann_file and img_dir"
            )
        base = Path(root) if root is not None else None
        if base is not None and not base.is_dir():
            raise FileNotFoundError(f"{name}: root {base} is not a directory; expected\n{tree}")
        ann = Path(ann_file if ann_file is not None else self.default_ann_file.format(split=self.split))
        images = Path(img_dir if img_dir is not None else self.default_img_dir.format(split=self.split))
        if base is not None:
            ann, images = base / ann, base / images  # an absolute path stays as it is
        # Explicit paths name themselves; default ones show the tree they come from.
        if not ann.is_file():
            expected = f"ann_file={ann_file} to be a COCO-format JSON" if ann_file else f"\n{tree}"
            raise FileNotFoundError(f"{name}: annotation file {ann} not found; expected {expected}")
        if not images.is_dir():
            expected = f"img_dir={img_dir} to hold the images" if img_dir else f"\n{tree}"
            raise FileNotFoundError(f"{name}: image folder {images} not found; expected {expected}")
        return ann, images

    def _build_meta(self, categories: list[dict], num_classes: int | None) -> DatasetMeta:
        categories = sorted(categories, key=lambda c: c["id"])
        ids = [int(c["id"]) for c in categories]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.gt_json}: category ids repeat: {ids}")
        if not ids:
            raise ValueError(f"{self.gt_json} has no categories; expected at least one")
        if num_classes is not None and int(num_classes) != len(ids) + 1:
            raise ValueError(
                f"num_classes={num_classes} but {self.gt_json} has {len(ids)} categories; pass "
                f"num_classes={len(ids) + 1} (the categories plus background)"
            )
        background_id = 0 if 0 not in ids else ids[0] - 1
        self._contiguous = {cat_id: k for k, cat_id in enumerate(ids, 1)}
        return DatasetMeta(
            classes=["background", *(str(c["name"]) for c in categories)],
            palette=default_palette(len(ids) + 1),
            thing_ids=list(range(1, len(ids) + 1)),
            stuff_ids=[0],
            category_ids=[background_id, *ids],
        )

    def _image_path(self, image: dict) -> Path:
        return self.img_dir / image["file_name"]

    def _index(self, data: dict) -> list[_Record]:
        """Clean every image's annotations into compact records (see the class docstring)."""
        anns_by_image: dict[int, list[dict]] = defaultdict(list)
        for ann in data.get("annotations", ()):
            anns_by_image[ann["image_id"]].append(ann)
        images = sorted(data["images"], key=lambda im: im["id"])
        # Pass 1: per-annotation checks; the polygon parts of all images are collected so that
        # their areas are computed in one vectorised call (millions of parts on COCO train).
        kept, parts = [], []
        skipped_boxes = 0
        for image in images:
            height, width = int(image["height"]), int(image["width"])
            rows = []
            for ann in anns_by_image.get(image["id"], ()):
                if self.train and ann.get("iscrowd", 0):
                    continue
                row = self._clean(ann, height, width, parts)
                if row is None:
                    skipped_boxes += 1
                else:
                    rows.append(row)
            kept.append((image, rows))
        nonzero = (_polygon_areas(parts) > 0).tolist()
        # Pass 2: drop zero-area parts, then annotations with no part left.
        records, skipped_polygons = [], 0
        for image, rows in kept:
            record, skipped = self._record(image, rows, parts, nonzero)
            skipped_polygons += skipped
            if record is not None:
                records.append(record)
        if skipped_polygons or skipped_boxes:
            log.warning(
                "%s: skipped %d annotations with degenerate polygons (fewer than 3 points or zero "
                "area) and %d with zero-area boxes", self.gt_json, skipped_polygons, skipped_boxes,
            )
        if len(records) < len(images):
            log.info(
                "%s: %d of %d images have no usable annotations and are skipped for training",
                self.gt_json, len(images) - len(records), len(images),
            )
        return records

    def _record(
        self, image: dict, rows: list[tuple], parts: list[list[float]], nonzero: list[bool]
    ) -> tuple[_Record | None, int]:
        """One image's record (None when filtered out as empty) and how many annotations lost
        every polygon part."""
        segs, boxes, labels, crowd = [], [], [], []
        skipped = 0
        for box, label, iscrowd, seg in rows:
            if isinstance(seg, range):
                part_ok = nonzero[seg.start : seg.stop]
                seg = parts[seg.start : seg.stop] if all(part_ok) else [
                    p for p, ok in zip(parts[seg.start : seg.stop], part_ok) if ok
                ]
                if not seg:
                    skipped += 1
                    continue
            segs.append(seg)
            boxes.append(box)
            labels.append(label)
            crowd.append(iscrowd)
        if self.filter_empty and not segs:
            return None, skipped
        return (
            int(image["id"]), str(self._image_path(image)), int(image["height"]),
            int(image["width"]), np.array(boxes, dtype=np.float32).reshape(-1, 4),
            np.array(labels, dtype=np.int64), np.array(crowd, dtype=np.int64), segs,
        ), skipped

    def _clean(
        self, ann: dict, height: int, width: int, parts: list[list[float]]
    ) -> tuple[tuple[float, ...], int, int, Any] | None:
        """(box XYXY, label, iscrowd, segmentation) of one annotation; None for a zero-area box.

        Polygon parts with at least 3 points are appended to `parts` and the segmentation is
        the range of their indices there. (Runs once per annotation: ~1M times on COCO train.)
        """
        try:
            x, y, w, h = ann["bbox"]
            label = self._contiguous[ann["category_id"]]
            seg = ann["segmentation"]
        except (KeyError, TypeError, ValueError):
            raise self._malformed(ann) from None
        x1, y1 = min(max(x, 0), width), min(max(y, 0), height)
        x2, y2 = min(max(x + w, 0), width), min(max(y + h, 0), height)
        if x2 <= x1 or y2 <= y1:
            return None
        if isinstance(seg, list):
            start = len(parts)
            # pycocotools reads a 4-number list as a box and rejects shorter ones.
            parts += [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
            seg = range(start, len(parts))
        elif not isinstance(seg, dict) or list(seg.get("size", ())) != [height, width]:
            what = f"RLE of size {seg.get('size')}" if isinstance(seg, dict) else type(seg).__name__
            raise ValueError(
                f"{self.gt_json}: annotation {ann.get('id')}: segmentation is {what}; expected "
                f"polygons, or RLE of size [{height}, {width}] (its image's height and width)"
            )
        return (x1, y1, x2, y2), label, ann.get("iscrowd", 0), seg

    def _malformed(self, ann: dict) -> Exception:
        where = f"{self.gt_json}: annotation {ann.get('id')}"
        missing = [key for key in ("bbox", "segmentation", "category_id") if key not in ann]
        if missing:
            return KeyError(
                f"{where} lacks {missing}; expected 'bbox' [x, y, w, h], 'segmentation' "
                "(polygons or RLE) and 'category_id'"
            )
        if ann["category_id"] not in self._contiguous:
            return KeyError(
                f"{where} has category_id {ann['category_id']}, which is not among the JSON's "
                f"categories {list(self._contiguous)}"
            )
        return ValueError(f"{where} has bbox {ann['bbox']}; expected [x, y, width, height]")

    def _check_first_image(self) -> None:
        # A wrong img_dir shows up here, before any model is built.
        image_id, path = self._records[0][:2]
        if not os.path.isfile(path):
            raise FileNotFoundError(self._missing_image(image_id, path))

    def _missing_image(self, image_id: int, path: str) -> str:
        return (
            f"image file {path} not found (image id {image_id}, listed in {self.gt_json}); "
            f"expected every image of the JSON under {self.img_dir}"
        )

    def image_categories(self) -> list[list[int]]:
        """Each item's contiguous labels (in [1, K], sorted, once each) as the JSON annotates
        them, after the cleaning of the targets (crowd regions out for training): no mask is
        decoded. For `data.sampler=repeat_factor`."""
        parts = np.split(self._labels, self._label_ends[:-1]) if len(self._label_ends) else []
        return [sorted(set(part.tolist())) for part in parts]

    # ------------------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image_id, path, height, width, boxes, labels, iscrowd, segs = self._records[int(index)]
        try:
            image = read_image(path)
        except FileNotFoundError:
            raise FileNotFoundError(self._missing_image(image_id, path)) from None
        if tuple(image.shape[-2:]) != (height, width):
            raise ValueError(
                f"{path} is {tuple(image.shape[-2:])} (H, W) but {self.gt_json} says "
                f"({height}, {width}) for image id {image_id}"
            )
        try:
            masks = decode_masks(segs, height, width)
        except ValueError as err:
            raise ValueError(f"{self.gt_json}: image id {image_id}: {err}") from err
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(boxes), format="XYXY", canvas_size=(height, width)
            ),
            "masks": tv_tensors.Mask(masks),
            "labels": torch.from_numpy(labels),
            "iscrowd": torch.from_numpy(iscrowd),
            "image_id": image_id,
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class LVISInstanceDataset(COCOInstanceDataset):
    """LVIS v1 (1203 categories) over the COCO 2017 images; items as `COCOInstanceDataset`'s.

    Layout: ROOT/annotations/lvis_v1_{split}.json, and COCO's ROOT/train2017/ and
    ROOT/val2017/ (LVIS images name their file by `coco_url`, whose last two parts are the
    COCO folder and file: LVIS val draws from both). `img_dir` (default ROOT) holds those
    folders. `category_frequency[k]` is "r", "c" or "f" (rare, common, frequent) for label k;
    `neg_category_ids` / `not_exhaustive_category_ids` are the evaluator's (it reads `gt_json`).
    """

    default_ann_file = "annotations/lvis_v1_{split}.json"
    default_img_dir = "."
    layout = "{root}/\n  annotations/lvis_v1_{split}.json\n  train2017/*.jpg\n  val2017/*.jpg"

    def _build_meta(self, categories: list[dict], num_classes: int | None) -> DatasetMeta:
        meta = super()._build_meta(categories, num_classes)
        try:
            frequency = {int(c["id"]): str(c["frequency"]) for c in categories}
        except KeyError:
            raise KeyError(
                f"{self.gt_json}: a category lacks 'frequency'; expected an LVIS v1 JSON whose "
                "categories are marked 'r', 'c' or 'f'"
            ) from None
        self.category_frequency = {k: frequency[i] for i, k in self._contiguous.items()}
        return meta

    def _image_path(self, image: dict) -> Path:
        url = image.get("coco_url")
        if url:
            folder, name = str(url).rsplit("/", 2)[-2:]
            return self.img_dir / folder / name
        return self.img_dir / image["file_name"]

    def _missing_image(self, image_id: int, path: str) -> str:
        return (
            f"image file {path} not found (image id {image_id}, listed in {self.gt_json}); "
            f"expected COCO's train2017/ and val2017/ folders under {self.img_dir}"
        )


def _polygon_areas(parts: list[list[float]]) -> np.ndarray:
    """Shoelace areas (float64, one per part) of flat [x0, y0, x1, y1, ...] polygons, >= 3 points."""
    if not parts:
        return np.zeros(0)
    counts = np.fromiter((len(p) // 2 for p in parts), dtype=np.int64, count=len(parts))
    xy = np.fromiter(chain.from_iterable(parts), dtype=np.float64, count=2 * int(counts.sum()))
    x, y = xy[0::2], xy[1::2]
    ends = np.cumsum(counts)
    starts = ends - counts
    following = np.arange(1, len(x) + 1)
    following[ends - 1] = starts  # each polygon closes on its first vertex
    cross = x * y[following] - x[following] * y
    return 0.5 * np.abs(np.add.reduceat(cross, starts))


@contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected a COCO-format annotation file") from err
    missing = [key for key in ("images", "categories") if key not in data] if isinstance(data, dict) else []
    if not isinstance(data, dict) or missing:
        raise ValueError(
            f"{path} lacks {missing or 'a top-level object'}; expected a COCO-format JSON with "
            "'images', 'annotations' and 'categories'"
        )
    return data


class _PackedList:
    """A read-only list kept as one pickled byte buffer.

    Loader workers forked from the main process would otherwise copy the annotations page by
    page: reading millions of small Python objects writes their reference counts.
    """

    def __init__(self, items: list[Any]) -> None:
        blobs = [pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._data = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Any:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is outside [0, {len(self)})")
        index %= len(self)
        start = int(self._ends[index - 1]) if index else 0
        return pickle.loads(self._data[start : int(self._ends[index])].tobytes())
