"""Prediction files in the datasets' standard formats, written as batches arrive.

Under OUTPUT, for what the model predicts (`segtrain.predictions`):
- `semantic/<stem>.png`: palette PNG of contiguous class ids (what `segtrain score task=semantic`
  and VOC-style tools read);
- `instances.json`: COCO results, every detection (AP needs the low scores too), as a dict
  {"images": [{id, file_name, height, width}], "annotations": [{id, image_id, category_id (the
  dataset's id), segmentation (RLE), bbox [x, y, w, h], score, area, iscrowd: 0, file_name}],
  "categories": [{id, name}]}: `pycocotools.coco.COCO(path)` loads it, `coco_gt.loadRes(
  data["annotations"])` takes its detections, `segtrain score task=instance` matches its images
  to the ground truth's by file stem;
- `instances/<stem>.png`: the instance-id map of the detections scoring >= `score_thresh` (the
  layout `dataset=instance_folder` reads): 0 = background, k = the k-th best of them, painted from
  the lowest score up so the best wins where masks overlap; 8-bit, 16-bit past 255 objects;
- `panoptic/<stem>.png` + `panoptic.json`: COCO panoptic format (RGB-encoded ids; segments_info
  {id, category_id (dataset id), isthing, score, area}), with `images` and `categories`;
- `overlays/<stem>.jpg` (overlay=true): a picture for people; instances below `score_thresh`
  are left out of it (and only of it);
- `skipped.txt`: the lines `close(skipped=...)` is given (predict: "path<TAB>reason" of each file
  that did not decode; empty when none).
Per-image files are written by the rank that predicted the image; the JSON records are gathered
to rank 0 and written there in input order. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image
from torch.nn import functional as nnf

from segtrain.data.codecs.file_names import image_stem
from segtrain.data.codecs.image_io import write_label
from segtrain.data.export.semantic import label_palette
from segtrain.data.meta import DatasetMeta
from segtrain.inference.overlays import render_overlay
from segtrain.metrics.coco import predictions_to_results
from segtrain.metrics.panoptic import panoptic_categories, segment_areas, write_panoptic_png
from segtrain.predictions import instance_meta, semantic_labels
from segtrain.utils.distributed import all_gather_objects, broadcast_object, is_main_process
from segtrain.utils.files import write_atomically
from segtrain.utils.tensors import to_cpu

OUTPUT_FILES = ("instances.json", "panoptic.json", "skipped.txt")
OUTPUT_DIRS = ("semantic", "instances", "panoptic", "overlays")
JPEG_QUALITY = 90
_PENDING_PER_THREAD = 8  # images queued per write thread before `write` waits (bounds memory)


def existing_outputs(output_dir: str | os.PathLike) -> list[Path]:
    """Prediction files already in `output_dir` (the JSON files, skipped.txt, anything in
    semantic/, panoptic/ or overlays/), sorted; other files do not count."""
    root = Path(output_dir)
    found = [root / name for name in OUTPUT_FILES if (root / name).exists()]
    for name in OUTPUT_DIRS:
        if (root / name).is_dir():
            found += [p for p in (root / name).rglob("*") if p.is_file()]
    return sorted(found)


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> None:
    """FileExistsError naming the first prediction file in `output_dir` unless `overwrite`.

    Decided on rank 0 and told to the others (a rank checking later would see rank 0's files).
    """
    found = None
    if is_main_process() and not overwrite:
        existing = existing_outputs(output_dir)
        found = (str(existing[0]), len(existing)) if existing else None
    found = broadcast_object(found)
    if found is not None:
        first, count = found
        raise FileExistsError(f"{output_dir} already holds predictions ({count} files, e.g. {first}); "
                              "pass overwrite=true to replace them, or choose another output=")


@dataclass
class _Image:
    """One image's work for the write thread: CPU tensors only."""

    image_id: int
    file_name: str
    size: tuple[int, int]
    prediction: dict[str, Any]
    picture: torch.Tensor | None  # uint8 (3, H, W) to draw the overlay on; None: no overlay

    @property
    def stem(self) -> str:
        return image_stem(self.file_name)


@dataclass
class _Records:
    """What an image adds to the JSON files."""

    image: dict[str, Any]
    results: list[dict[str, Any]] | None  # None: the model predicts no instances
    panoptic: dict[str, Any] | None


class PredictionWriter:
    """Writes predictions in the contract format to `output_dir` (see the module docstring).

    `write(images, targets, predictions)` per batch, then `close()` once on every rank (or
    `abort()` on the way out of a failed run). meta: the model's class metadata (names, palette,
    dataset category ids). overlay: also draw `overlays/<stem>.jpg`, keeping instances scoring
    >= `score_thresh`. overwrite: replace existing prediction files (files of images not predicted
    this time stay); without it a directory that holds any is refused at construction.
    threads: background threads that encode and write the files while the model predicts the next
    batch (0: in the caller's thread); their errors are raised by a later `write` or `close`.
    """

    def __init__(self, output_dir: str | os.PathLike, meta: DatasetMeta, overlay: bool = True,
                 score_thresh: float = 0.5, overwrite: bool = False, threads: int = 1) -> None:
        if not 0.0 <= score_thresh <= 1.0:
            raise ValueError(f"score_thresh={score_thresh}; expected a score in [0, 1]")
        self.output_dir, self.meta = Path(output_dir), meta
        self.overlay, self.score_thresh = overlay, float(score_thresh)
        check_output_dir(self.output_dir, overwrite)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._thing_meta = instance_meta(meta) if meta.thing_ids else meta
        self._palette = label_palette(meta)
        self._records: list[_Records] = []
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="prediction-writer") if threads else None
        self._pending: deque[Future] = deque()
        self._max_pending = _PENDING_PER_THREAD * max(threads, 1)

    def write(self, images: Sequence[torch.Tensor] | None, targets: Sequence[dict],
              predictions: Sequence[dict]) -> None:
        """Write one batch. images: uint8 (3, H, W) each, unpadded (resized to the original size
        for the overlay when it differs), or None (no overlays); targets: `image_id`, `orig_size`
        [H, W] and `file_name` (an image's file name or stem; default f"{image_id:012d}");
        predictions: the contract's dicts, on any device."""
        if len(targets) != len(predictions):
            raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions in a batch")
        for index, (target, prediction) in enumerate(zip(targets, predictions)):
            image_id = int(target["image_id"])
            height, width = (int(v) for v in target["orig_size"])
            picture = None
            if self.overlay and images is not None:
                picture = torch.as_tensor(images[index]).as_subclass(torch.Tensor).cpu()
            job = _Image(image_id, str(target.get("file_name", f"{image_id:012d}")), (height, width),
                         self._on_cpu(prediction), picture)
            if self._pool is None:
                self._records.append(self._write_image(job))
            else:
                self._pending.append(self._pool.submit(self._write_image, job))
                self._collect(self._max_pending)

    def _on_cpu(self, prediction: dict[str, Any]) -> dict[str, Any]:
        """The prediction on the CPU; a semantic map as uint8 when the classes fit (8x less to copy)."""
        moved = dict(prediction)
        if "sem_seg" in moved:
            labels = semantic_labels(moved["sem_seg"])
            moved["sem_seg"] = labels.to(torch.uint8) if self.meta.num_classes <= 256 else labels
        return to_cpu(moved)

    def _collect(self, keep: int) -> None:
        """Wait for the oldest writes until at most `keep` are pending; raises what they raised."""
        while len(self._pending) > keep:
            self._records.append(self._pending.popleft().result())

    def _write_image(self, job: _Image) -> _Records:
        height, width = job.size
        prediction, stem = job.prediction, job.stem
        if "sem_seg" in prediction:
            labels = prediction["sem_seg"]
            _check_size("sem_seg", tuple(labels.shape), job.size, stem)
            write_label(self.output_dir / "semantic" / f"{stem}.png", labels, self._palette, atomic=True)
        results = None
        if "instances" in prediction:
            _check_size("instances", tuple(prediction["instances"]["masks"].shape[-2:]), job.size, stem)
            found = predictions_to_results(job.image_id, prediction["instances"], self._thing_meta)
            results = [{**r, "area": _area(r), "iscrowd": 0, "file_name": job.file_name} for r in found]
            ids = instance_id_map(prediction["instances"], job.size, self.score_thresh)
            write_atomically(self.output_dir / "instances" / f"{stem}.png",
                             lambda f: Image.fromarray(ids).save(f, format="PNG"), binary=True)
        panoptic = None
        if "panoptic" in prediction:
            panoptic = self._write_panoptic(job.image_id, stem, prediction, job.size)
        if job.picture is not None:
            self._write_overlay(stem, job.picture, prediction, job.size)
        return _Records({"id": job.image_id, "file_name": job.file_name, "height": height, "width": width},
                        results, panoptic)

    def _write_panoptic(self, image_id: int, stem: str, prediction: dict,
                        size: tuple[int, int]) -> dict[str, Any]:
        ids = prediction["panoptic"].numpy().astype(np.int64)
        _check_size("panoptic", ids.shape, size, stem)
        segments = prediction["segments"]
        write_panoptic_png(self.output_dir / "panoptic" / f"{stem}.png", ids)
        areas = segment_areas(ids, np.array([int(s["id"]) for s in segments], dtype=np.int64))
        info = [{"id": int(s["id"]), "category_id": self.meta.category_id(int(s["category_id"])),
                 "isthing": int(bool(s.get("isthing", int(s["category_id"]) in self.meta.thing_ids))),
                 "score": float(s.get("score", 1.0)), "area": int(area)}
                for s, area in zip(segments, areas)]
        return {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": info}

    def _write_overlay(self, stem: str, image: torch.Tensor, prediction: dict,
                       size: tuple[int, int]) -> None:
        if tuple(image.shape[-2:]) != size:  # the loader resized it: draw at the original size
            image = nnf.interpolate(image[None].float(), size=size, mode="bilinear",
                                    align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        picture = render_overlay(image, prediction, self.meta, self.score_thresh)
        write_atomically(self.output_dir / "overlays" / f"{stem}.jpg",
                         lambda f: picture.save(f, format="JPEG", quality=JPEG_QUALITY), binary=True)

    def close(self, skipped: Sequence[str] = ()) -> dict[str, int]:
        """Finish the pending writes, gather every rank's JSON records and write the JSON files
        and `skipped.txt` (rank 0).

        Call on every rank. skipped: this rank's files that did not decode. Returns the counts
        over all ranks: {"images", "detections", "skipped"}.
        """
        try:
            self._collect(0)
        finally:
            self.abort()
        shards = all_gather_objects((self._records, list(skipped)))
        records = [r for shard in shards for r in shard[0]]
        skipped_all = [p for shard in shards for p in shard[1]]
        images = [r.image for r in records]
        results = [d for r in records for d in r.results or ()]
        panoptic = [r.panoptic for r in records if r.panoptic is not None]
        if is_main_process():
            if any(r.results is not None for r in records):
                self._write_json("instances.json", {
                    "images": images,
                    "annotations": [{"id": i, **r} for i, r in enumerate(results, start=1)],
                    "categories": instance_categories(self._thing_meta)})
            if panoptic:
                self._write_json("panoptic.json", {"images": images, "annotations": panoptic,
                                                   "categories": panoptic_categories(self.meta)})
            text = "".join(f"{path}\n" for path in skipped_all)
            write_atomically(self.output_dir / "skipped.txt", lambda f: f.write(text), binary=False)
        return {"images": len(images), "detections": len(results), "skipped": len(skipped_all)}

    def abort(self) -> None:
        """Stop the write threads: writes not started are dropped, running ones finish."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _write_json(self, name: str, data: dict) -> None:
        text = json.dumps(data)
        write_atomically(self.output_dir / name, lambda f: f.write(text), binary=False)


def instance_categories(meta: DatasetMeta) -> list[dict[str, Any]]:
    """COCO `categories` of instance labels: the thing classes (every class when none is
    marked), as {id (the dataset's), name}."""
    return [{"id": meta.category_id(k), "name": meta.classes[k]}
            for k in meta.thing_ids or range(meta.num_classes)]


def instance_id_map(instances: dict[str, Any], size: tuple[int, int], score_thresh: float) -> np.ndarray:
    """(H, W) uint8 (uint16 past 255 objects): 0 background, k the k-th best detection scoring
    >= score_thresh; painted from the lowest score up, so the best wins where masks overlap."""
    scores = torch.as_tensor(instances["scores"]).float()
    keep = (scores >= score_thresh).nonzero().squeeze(1)
    order = keep[torch.argsort(scores[keep], descending=True, stable=True)].tolist()
    ids = np.zeros(size, dtype=np.uint16 if len(order) > 255 else np.uint8)
    masks = torch.as_tensor(instances["masks"])
    for k in range(len(order), 0, -1):
        ids[masks[order[k - 1]].bool().numpy()] = k
    return ids


def _area(result: dict) -> float:
    """The detection's mask area (pixels), as loadRes computes it; its box area without a mask."""
    if "segmentation" not in result:
        return float(result["bbox"][2] * result["bbox"][3])
    return float(mask_util.area(result["segmentation"]))


def _check_size(key: str, shape: tuple[int, ...], size: tuple[int, int], stem: str) -> None:
    if tuple(shape) != tuple(size):
        raise ValueError(f"image {stem}: the {key} prediction is {tuple(shape)} but the image is "
                         f"{tuple(size)}; predictions must be at the original image size "
                         "(segtrain.predictions)")
