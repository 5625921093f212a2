"""`segtrain data check|show`: validate any configured dataset item by item, or draw a grid of samples."""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig
from PIL import Image
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from segtrain.data.meta import DatasetMeta

log = logging.getLogger("segtrain.data")
# What a broken item raises while it is read: reported as a problem of that item, then go on.
ITEM_ERRORS = (ValueError, KeyError, IndexError, OSError)


def data(cfg: DictConfig) -> None:
    """Entry point of `segtrain data`: `action` is check or show."""
    if cfg.action == "check":
        check(cfg)
    elif cfg.action == "show":
        show(cfg)
    else:
        raise ValueError(f"action={cfg.action}: expected check or show (segtrain data check|show ...)")


def build_splits(cfg: DictConfig) -> dict[str, Any]:
    """The configured train (and val) datasets without their transforms: what is on disk.

    Like `train.build_data`, class counts left null in `cfg.dataset` are filled from the train
    set's metadata, so the val set is built with the same classes. A dataset whose constructor
    takes `strict` (dataset=folder) is built with strict=False: the problems its label scan
    finds are kept in its `label_problems` for `check` to report with the rest, not raised.
    """
    def build(node: DictConfig) -> Any:
        options = {"transforms": None} if "transforms" in node else {}
        if "strict" in inspect.signature(get_object(node._target_)).parameters:
            options["strict"] = False
        return instantiate(node, **options)

    from segtrain.builders import fill_class_counts

    splits = {"train": build(cfg.dataset.train)}
    fill_class_counts(cfg, splits["train"].meta)
    if cfg.dataset.get("val") is not None:
        splits["val"] = build(cfg.dataset.val)
    return splits


# ---------------------------------------------------------------------------------------- check
@dataclass
class SplitStats:
    """What `check_split` saw. pixels / images_with: int64 (C,) per class; void = ignore_index."""

    name: str
    size: int
    num_classes: int
    checked: int = 0
    pixels: torch.Tensor = None  # type: ignore[assignment]
    images_with: torch.Tensor = None  # type: ignore[assignment]
    instances_of: torch.Tensor = None  # type: ignore[assignment]
    void_pixels: int = 0
    all_pixels: int = 0
    instances: list[int] = field(default_factory=list)
    object_areas: list[int] = field(default_factory=list)  # pixels of each instance mask
    overlapping: int = 0  # instance masks sharing pixels with another (COCO allows overlap)
    overlap_images: int = 0
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        zeros = torch.zeros(self.num_classes, dtype=torch.int64)
        self.pixels, self.images_with, self.instances_of = zeros.clone(), zeros.clone(), zeros.clone()


def check_split(dataset: Any, name: str, limit: int | None = None) -> SplitStats:
    """Read items 0..limit-1 of `dataset` and check each against its `meta`.

    Checks: the item reads; image uint8 (3, H, W); `semantic` is (H, W) with values in
    [0, C) or ignore_index; instance `masks` are (N, H, W), `labels` name thing classes, `boxes`
    lie in the image. Problems are collected (not raised) so one run reports all of them.
    """
    meta: DatasetMeta = dataset.meta
    stats = SplitStats(name, len(dataset), meta.num_classes)
    for index in range(len(dataset) if limit is None else min(int(limit), len(dataset))):
        stats.checked += 1
        try:
            image, target = dataset[index]
        except ITEM_ERRORS as err:
            stats.problems.append(f"{name}[{index}]: {err}")
            continue
        where = f"{name}[{index}]" + (f" ({target['file_name']})" if "file_name" in target else "")
        stats.problems += [f"{where}: {p}" for p in _check_item(image, target, meta, stats)]
    return stats


def _check_item(image: torch.Tensor, target: dict, meta: DatasetMeta, stats: SplitStats) -> list[str]:
    problems = []
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        problems.append(f"image is {image.dtype} {tuple(image.shape)}; expected uint8 (3, H, W)")
    size = tuple(image.shape[-2:])
    semantic = target.get("semantic")
    if semantic is not None:
        semantic = torch.as_tensor(semantic)
        if tuple(semantic.shape) != size:
            problems.append(f"semantic mask is {tuple(semantic.shape)} but the image is {size} (H, W)")
        valid = (semantic >= 0) & (semantic < meta.num_classes)
        void = semantic == meta.ignore_index
        if not bool((valid | void).all()):
            values = torch.unique(semantic[~(valid | void)]).tolist()
            problems.append(f"label values {values[:8]} are outside the {meta.num_classes} classes "
                            f"[0, {meta.num_classes}) and not ignore_index={meta.ignore_index}")
        counts = torch.bincount(semantic[valid].long(), minlength=meta.num_classes)
        stats.pixels += counts
        stats.images_with += counts > 0
        stats.void_pixels += int(void.sum())
        stats.all_pixels += semantic.numel()
    if "labels" in target:
        classes = thing_classes(torch.as_tensor(target["labels"]), meta)
        if classes is None:
            problems.append(f"instance labels {torch.as_tensor(target['labels']).unique().tolist()} "
                            "name no thing class of the dataset")
        else:
            stats.instances.append(len(classes))
            stats.instances_of += torch.bincount(classes, minlength=meta.num_classes)
            if semantic is None:
                stats.images_with += torch.bincount(classes.unique(), minlength=meta.num_classes)
    masks = target.get("masks")
    if masks is not None and len(masks) and tuple(masks.shape[-2:]) != size:
        problems.append(f"instance masks are {tuple(masks.shape[-2:])} but the image is {size} (H, W)")
    elif masks is not None and len(masks):
        _count_objects(torch.as_tensor(masks).as_subclass(torch.Tensor).bool(), stats)
    boxes = target.get("boxes")
    if boxes is not None and len(boxes):
        height, width = size
        b = torch.as_tensor(boxes).float()
        inside = (b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= width) & (b[:, 3] <= height)
        if not bool((inside & (b[:, 2] >= b[:, 0]) & (b[:, 3] >= b[:, 1])).all()):
            problems.append(f"{int((~inside).sum())} boxes lie outside the {width}x{height} image "
                            "or have x2 < x1 / y2 < y1")
    return problems


def _count_objects(masks: torch.Tensor, stats: SplitStats) -> None:
    """Object sizes and overlaps of one image's bool (N, H, W) masks (numpy: torch's bool sums
    are ~10x slower on hundreds of masks)."""
    flat = masks.numpy().reshape(len(masks), -1)
    stats.object_areas += np.count_nonzero(flat, axis=1).tolist()
    shared = flat.sum(0, dtype=np.int32) > 1
    if shared.any():
        stats.overlapping += int(np.count_nonzero((flat & shared).any(1)))
        stats.overlap_images += 1


def thing_classes(labels: torch.Tensor, meta: DatasetMeta) -> torch.Tensor | None:
    """Contiguous class ids of instance labels (1 + index into meta.thing_ids); None if invalid."""
    labels = labels.long()
    things = meta.thing_ids or list(range(1, meta.num_classes))
    if len(labels) and not bool(((labels >= 1) & (labels <= len(things))).all()):
        return None
    return torch.tensor(things, dtype=torch.int64)[labels - 1] if len(labels) else labels


def format_stats(stats: SplitStats, meta: DatasetMeta, void_note: str | None = None) -> str:
    """The summary table of one split: class, pixels % (of non-void pixels), images containing it.

    `void_note` says how void is written (default "ignore_index=N"), e.g. "raw value 11 in the
    files -> ignore_index=255" when classes.yaml names another void value than the targets use.
    """
    lines = [f"{stats.name}: {stats.size} images ({stats.checked} checked, {len(stats.problems)} problems)"]
    has_pixels, has_instances = stats.all_pixels > 0, bool(stats.instances)
    width = max([5, *(len(c) for c in meta.classes)])
    header = f"  {'class':<{width}}"
    header += "  pixels %" if has_pixels else ""
    header += "  images" + ("  instances" if has_instances else "")
    lines.append(header)
    labelled = max(int(stats.pixels.sum()), 1)
    for c, name in enumerate(meta.classes):
        row = f"  {name:<{width}}"
        row += f"  {100.0 * int(stats.pixels[c]) / labelled:8.2f}" if has_pixels else ""
        row += f"  {int(stats.images_with[c]):6d}"
        row += f"  {int(stats.instances_of[c]):9d}" if has_instances else ""
        lines.append(row)
    if has_pixels:
        lines.append(f"  void ({void_note or f'ignore_index={meta.ignore_index}'}): "
                     f"{100.0 * stats.void_pixels / stats.all_pixels:.2f}% of all pixels")
    if has_instances:
        n = stats.instances
        lines.append(f"  instances per image: mean {sum(n) / len(n):.2f}, min {min(n)}, max {max(n)}, "
                     f"{sum(n)} in all")
    if stats.object_areas:
        areas = sorted(stats.object_areas)
        lines.append(f"  objects: {len(areas)} in {len(n)} images; size (pixels) min {areas[0]}, median "
                     f"{areas[len(areas) // 2]}, max {areas[-1]}; {stats.overlapping} overlap another object "
                     f"(in {stats.overlap_images} images)")
    return "\n".join(lines)


def scan_findings(dataset: Any, name: str, all_items_read: bool) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a dataset's label scan (`label_problems`, dataset=folder).

    Values outside the classes and masks that do not decode are reported by the item reads,
    with their file, so the scan's own report of them is left out when every item was read.
    """
    errors, warnings = [], []
    for problem in getattr(dataset, "label_problems", []):
        if problem.level == "warning":
            warnings.append(problem.message)
        elif not (all_items_read and problem.kind in ("range", "unreadable")):
            errors.append(f"{name}: {problem.message}")
    return errors, warnings


def check(cfg: DictConfig) -> None:
    """Print each split's summary and warnings; any problem is a ValueError listing the first
    few (exit 1). Besides reading every item (or `n`), the label scan of dataset=folder judges
    the values of every mask (binary 0/255 masks, noise, stray and rare values, gaps)."""
    splits = build_splits(cfg)
    problems, warned = [], 0
    for name, dataset in splits.items():
        stats = check_split(dataset, name, cfg.n)
        errors, warnings = scan_findings(dataset, name, stats.checked == stats.size)
        stats.problems = errors + stats.problems
        print(format_stats(stats, dataset.meta, getattr(dataset, "void_note", None)), flush=True)
        for message in warnings:
            print("  WARNING: " + message.replace("\n", "\n    "), flush=True)
        warned += len(warnings)
        problems += stats.problems
    total = len(problems)
    if total:
        shown = "\n  ".join(p.replace("\n", "\n    ") for p in problems[: cfg.max_problems])
        more = f"\n  ... and {total - cfg.max_problems} more" if total > cfg.max_problems else ""
        raise ValueError(f"dataset={cfg.dataset.name}: {total} problems:\n  {shown}{more}")
    print(f"dataset={cfg.dataset.name}: no problems found"
          + (f" ({warned} warning{'s' * (warned > 1)} above)" if warned else ""))


# ----------------------------------------------------------------------------------------- show
def render_sample(image: torch.Tensor, target: dict, meta: DatasetMeta, alpha: float = 0.5) -> torch.Tensor:
    """uint8 (3, H, W): the image with its semantic mask (palette colours, alpha-blended; void
    left clear) or instance masks, and instance boxes with class names, drawn over it."""
    out = torch.as_tensor(image).as_subclass(torch.Tensor)
    semantic = target.get("semantic")
    classes = thing_classes(torch.as_tensor(target["labels"]), meta) if "labels" in target else None
    if semantic is not None:
        semantic = torch.as_tensor(semantic).as_subclass(torch.Tensor)
        present = [c for c in torch.unique(semantic).tolist() if 0 <= c < meta.num_classes]
        if present:
            masks = semantic.unsqueeze(0) == torch.tensor(present).view(-1, 1, 1)
            out = draw_segmentation_masks(out, masks, alpha=alpha, colors=[meta.palette[c] for c in present])
    elif target.get("masks") is not None and classes is not None and len(classes):
        masks = torch.as_tensor(target["masks"]).as_subclass(torch.Tensor).bool()
        out = draw_segmentation_masks(out, masks, alpha=alpha,
                                      colors=[meta.palette[c] for c in classes.tolist()])
    boxes = target.get("boxes")
    if boxes is not None and classes is not None and len(classes):
        out = draw_bounding_boxes(out, torch.as_tensor(boxes).as_subclass(torch.Tensor).float(),
                                  labels=[meta.classes[c] for c in classes.tolist()],
                                  colors=[meta.palette[c] for c in classes.tolist()])
    return out


def fit_in_cell(image: torch.Tensor, cell: int) -> torch.Tensor:
    """Resize uint8 (3, H, W) so its longer side is `cell`, then pad to (3, cell, cell) with black."""
    height, width = image.shape[-2:]
    scale = cell / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    image = F.resize(image, size, antialias=True)
    return F.pad(image, [0, 0, cell - size[1], cell - size[0]], fill=0)


def show(cfg: DictConfig) -> Path:
    """Write a grid PNG of the first `n` (default 16) samples of `split`; returns its path."""
    splits = build_splits(cfg)
    if cfg.split not in splits:
        raise KeyError(f"split={cfg.split}: dataset={cfg.dataset.name} has splits {', '.join(splits)}")
    dataset = splits[cfg.split]
    count = min(16 if cfg.n is None else int(cfg.n), len(dataset))
    if count < 1:
        raise ValueError(f"split={cfg.split} of dataset={cfg.dataset.name}: no samples to show (n={cfg.n})")
    cells = []
    for index in range(count):
        image, target = dataset[index]
        cells.append(fit_in_cell(render_sample(image, target, dataset.meta, cfg.alpha), cfg.cell_size))
    grid = make_grid(torch.stack(cells), nrow=math.ceil(math.sqrt(count)), padding=2)
    output = Path(cfg.output) if cfg.output else Path(HydraConfig.get().runtime.output_dir) / (
        f"samples_{cfg.split}.png")
    output.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(output)
    print(f"wrote {count} {cfg.split} samples of dataset={cfg.dataset.name} to {output}")
    return output
