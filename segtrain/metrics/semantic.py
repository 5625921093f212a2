"""Semantic segmentation metrics (mIoU, aAcc, mAcc, fwIoU, mDice, mFscore, mPrecision,
mRecall) from a confusion matrix; the matrix itself saved as CSV and as a heat-map PNG."""

from __future__ import annotations

import math
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from segtrain.metrics.base import Evaluator
from segtrain.predictions import semantic_labels
from segtrain.utils.distributed import is_main_process

# Up to this many rows past the classes, ignore_index gets its own row of the bincount (one fused
# pass); a farther or negative ignore_index is first remapped to row num_classes instead.
_DIRECT_IGNORE_SPAN = 256
_SHOW_VALUES = 8


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} differs from target shape "
            f"{tuple(target.shape)}; expected equal (N, H, W) or (H, W) label maps"
        )
    if pred.device != target.device:
        raise ValueError(f"prediction is on {pred.device} but target on {target.device}")
    for name, t in (("prediction", pred), ("target", target)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} dtype is {t.dtype}; expected integer class ids")


def _raise_bad_pred(pred: torch.Tensor, num_classes: int) -> None:
    values = torch.unique(pred[(pred < 0) | (pred >= num_classes)]).tolist()[:_SHOW_VALUES]
    raise ValueError(
        f"predicted class ids {values} are outside [0, {num_classes}) (num_classes={num_classes})"
    )


def _raise_bad_target(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    values = torch.unique(target[bad]).tolist()[:_SHOW_VALUES]
    raise ValueError(
        f"target label values {values} are outside [0, {num_classes}) and are not "
        f"ignore_index={ignore_index}; check num_classes, ignore_index or the label mapping"
    )


def _count_cpu(
    pred: torch.Tensor, target: torch.Tensor, c: int, ignore_index: int, rows: int, remap: bool
) -> torch.Tensor | None:
    """bincount of C * row + pred with NumPy; None when a target value is out of range.

    NumPy, not torch: torch's two-thread min/max/add ran 20x slower than this whenever the
    other core was busy (data loader workers, other jobs), waiting on a descheduled thread.
    A negative target makes the index negative (np.bincount refuses it) and one >= rows makes
    the result longer than rows * C, so only predictions need an explicit min/max.
    """
    p = pred.detach().numpy().reshape(-1).astype(np.int64, copy=False)
    t = target.detach().numpy().reshape(-1).astype(np.int64, copy=False)
    if p.min() < 0 or p.max() >= c:
        _raise_bad_pred(pred, c)
    if remap:  # ignore_index is negative or far: it becomes row C
        is_ignored = t == ignore_index
        if (((t < 0) | (t >= c)) & ~is_ignored).any():
            return None
        t = np.where(is_ignored, c, t)
    index = t * c
    index += p
    try:
        counts = np.bincount(index, minlength=rows * c)
    except ValueError:
        return None
    return torch.from_numpy(counts) if counts.size == rows * c else None


def _count_device(
    pred: torch.Tensor, target: torch.Tensor, c: int, ignore_index: int, rows: int, remap: bool
) -> torch.Tensor | None:
    """The same count with torch ops on the tensors' (accelerator) device; two host syncs."""
    p, t = pred.reshape(-1).long(), target.reshape(-1).long()
    checked = t
    if remap:  # validate with ignored pixels as 0, count them in row C
        is_ignored = t == ignore_index
        checked, t = t.masked_fill(is_ignored, 0), t.masked_fill(is_ignored, c)
    p_lo, p_hi, t_lo, t_hi = torch.stack([*torch.aminmax(p), *torch.aminmax(checked)]).tolist()
    if p_lo < 0 or p_hi >= c:
        _raise_bad_pred(pred, c)
    if t_lo < 0 or t_hi >= (c if remap else rows):
        return None
    return torch.bincount(torch.add(p, t, alpha=c), minlength=rows * c)


def compute_confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Pixel confusion matrix, int64 (C, C) on the inputs' device; rows = target, cols = pred.

    pred, target: integer tensors of one shape ((N, H, W), (H, W), ...). Target pixels equal to
    `ignore_index` count nowhere. Any other target value outside [0, C), or any prediction outside
    [0, C), raises ValueError naming the values.

    One bincount of `C * target + pred` over rows 0..max(C - 1, ignore_index): ignored pixels
    fall in their own row, dropped at the end, so no masking pass is needed, and a target value
    between C and ignore_index shows up as a count in a row that must stay empty.
    """
    _check_pair(pred, target)
    c = num_classes
    if pred.numel() == 0:
        return torch.zeros((c, c), dtype=torch.int64, device=pred.device)
    remap = not 0 <= ignore_index < c + _DIRECT_IGNORE_SPAN
    rows = c + 1 if remap else max(c, ignore_index + 1)
    ignore_row = c if remap else ignore_index
    count = _count_cpu if pred.device.type == "cpu" else _count_device
    counts = count(pred, target, c, ignore_index, rows, remap)
    if counts is None:
        _raise_bad_target(target, c, ignore_index)
    counts = counts.view(rows, c)
    if rows > c:
        stray = counts[c:].sum(dim=1)
        if ignore_row >= c:
            stray[ignore_row - c] = 0
        if bool(stray.any()):
            _raise_bad_target(target, c, ignore_index)
    confusion = counts[:c].clone()
    if ignore_row < c:
        confusion[ignore_row] = 0
    return confusion


def summarize_confusion_matrix(confusion: torch.Tensor, class_names: Sequence[str]) -> dict:
    """mIoU, aAcc, mAcc, fwIoU, mDice, mFscore, mPrecision, mRecall and per-class IoU / Acc /
    Dice / Fscore / Precision / Recall in percent from a (C, C) confusion matrix.

    Conventions (MMSegmentation for IoU/Acc/Dice/Fscore, FCN / detectron2 for fwIoU):
    - IoU_c = TP_c / (GT_c + Pred_c - TP_c); NaN when that union is empty over the whole
      evaluation, and NaN classes are left out of mIoU (nanmean). A class predicted but absent
      from the ground truth has IoU 0 and counts.
    - Acc_c = TP_c / GT_c; NaN when the class has no ground-truth pixel, left out of mAcc.
    - aAcc = sum TP / all valid (non-ignored) pixels.
    - fwIoU = sum over classes with GT_c > 0 of (GT_c / all valid pixels) * IoU_c.
    - Dice_c = 2 TP_c / (GT_c + Pred_c); Precision_c = TP_c / Pred_c; Recall_c = TP_c / GT_c (=
      Acc_c); Fscore_c = 2 P R / (P + R) (F1, MMSeg's beta 1); each NaN where its denominator is
      0 and left out of its mean; Fscore is 0 where P + R = 0.
    Every value is a Python float in [0, 100] or NaN (e.g. when no pixel was valid).
    """
    cm = confusion.detach().to("cpu", torch.float64)
    tp = cm.diagonal()
    gt = cm.sum(dim=1)
    union = gt + cm.sum(dim=0) - tp
    total = float(gt.sum())
    nan = torch.tensor(math.nan, dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    has_gt = gt > 0
    fw_iou = float((gt[has_gt] * iou[has_gt]).sum() / total) if total > 0 else math.nan
    predicted = cm.sum(dim=0)
    dice = torch.where(gt + predicted > 0, 2 * tp / (gt + predicted).clamp(min=1), nan)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), nan)
    recall = acc
    fscore = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall),
                         torch.where(precision.isnan() | recall.isnan(), nan, 0.0))
    per_class = {"IoU": iou, "Acc": acc, "Dice": dice, "Fscore": fscore, "Precision": precision,
                 "Recall": recall}
    return {
        "mIoU": 100 * _nanmean(iou),
        "aAcc": 100 * float(tp.sum()) / total if total > 0 else math.nan,
        "mAcc": 100 * _nanmean(acc),
        "fwIoU": 100 * fw_iou,
        "mDice": 100 * _nanmean(dice),
        "mFscore": 100 * _nanmean(fscore),
        "mPrecision": 100 * _nanmean(precision),
        "mRecall": 100 * _nanmean(recall),
        "per_class": {name: {key: 100 * float(values[i]) for key, values in per_class.items()}
                      for i, name in enumerate(class_names)},
    }


def _nanmean(values: torch.Tensor) -> float:
    kept = values[~values.isnan()]
    return float(kept.mean()) if kept.numel() else math.nan


def _check_lengths(targets: Sequence[dict], predictions: Sequence[dict]) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions in a batch")


class SemanticEvaluator(Evaluator):
    """Confusion-matrix evaluator for semantic segmentation; `compute()` -> `{"semantic": {...}}`.

    The int64 (C, C) matrix (rows = ground truth, cols = prediction) lives on `device`, or, when
    that is None, on the device of the first batch after `reset()`, so accumulation on a GPU never
    copies label maps to the host. See `summarize_confusion_matrix` for the metric conventions.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        device: torch.device | str | None = None,
        output_dir: str | os.PathLike | None = None,
    ) -> None:
        """`output_dir`: also write `confusion_matrix.csv` (pixel counts, rows = ground truth) and
        `confusion_matrix.png` (rows normalised) there at each `compute()` (rank 0)."""
        super().__init__()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}; expected a positive number of classes")
        names = [str(i) for i in range(num_classes)] if class_names is None else list(class_names)
        if len(names) != num_classes:
            raise ValueError(
                f"{len(names)} class names given for num_classes={num_classes}: {names[:5]}..."
            )
        if len(set(names)) != len(names):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"class names must be unique; repeated: {duplicates}")
        self.num_classes, self.ignore_index, self.class_names = num_classes, ignore_index, names
        self.device = torch.device(device) if device is not None else None
        self.reset()

    def reset(self) -> None:
        size = (self.num_classes, self.num_classes)
        self._add_state("confusion", torch.zeros(size, dtype=torch.int64, device=self.device))
        self._last_confusion: torch.Tensor | None = None
        self._placed = self.device is not None

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Accumulate integer label maps: pred and target (N, H, W) or (H, W), same shape."""
        counts = compute_confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        if not self._placed:
            self.confusion = self.confusion.to(counts.device)
            self._placed = True
        self.confusion += counts.to(self.confusion.device)

    def process(self, targets: Sequence[dict], predictions: Sequence[dict]) -> None:
        """targets: per-image dicts with `semantic` int64 (H, W) (ignore_index for void);
        predictions: per-image dicts with `sem_seg` (a label map or class scores, see
        segtrain.predictions) of the same size."""
        _check_lengths(targets, predictions)
        by_shape: dict[tuple[int, ...], tuple[list, list]] = {}
        for target, prediction in zip(targets, predictions):
            if "semantic" not in target or "sem_seg" not in prediction:
                raise KeyError(
                    f"the semantic evaluator needs targets with 'semantic' and predictions with "
                    f"'sem_seg'; got target keys {sorted(target)}, prediction keys {sorted(prediction)}"
                )
            labels = semantic_labels(prediction["sem_seg"])
            truth = target["semantic"]
            if labels.shape != truth.shape:
                raise ValueError(
                    f"image {target.get('image_id', '?')}: sem_seg is {tuple(labels.shape)} but the "
                    f"target is {tuple(truth.shape)}; predictions are at the original image size, so "
                    "evaluate without resizing transforms on the validation split"
                )
            preds, truths = by_shape.setdefault(tuple(truth.shape), ([], []))
            preds.append(labels.to(truth.device))
            truths.append(truth)
        # One count per image size, not per image: on a GPU each count costs two host syncs.
        for preds, truths in by_shape.values():
            self.update(torch.stack(preds), torch.stack(truths))

    @property
    def confusion_matrix(self) -> torch.Tensor:
        """This rank's accumulated int64 (C, C) matrix (a copy; not reduced across ranks)."""
        return self.confusion.clone()

    def figures(self) -> dict[str, torch.Tensor]:
        """Pictures of the last `compute()`: {"confusion_matrix": uint8 (3, H, W) heat map}."""
        if self._last_confusion is None:
            return {}
        from segtrain.metrics.confusion_plot import confusion_heatmap

        return {"confusion_matrix": confusion_heatmap(self._last_confusion, self.class_names)}

    def _compute(self, state: dict[str, Any]) -> dict:
        self._last_confusion = state["confusion"]
        if self.output_dir is not None and is_main_process():
            from segtrain.metrics.confusion_plot import write_confusion_matrix

            write_confusion_matrix(state["confusion"], self.class_names, self.output_dir)
        return {"semantic": summarize_confusion_matrix(state["confusion"], self.class_names)}


T = TypeVar("T")
R = TypeVar("R")


def _bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`map(fn, items)` on a thread pool, in order, with at most 2 * workers results pending."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _png_stems(directory: Path, role: str) -> dict[str, Path]:
    if not directory.exists():
        raise FileNotFoundError(f"{role} directory {directory} does not exist")
    if not directory.is_dir():
        raise FileNotFoundError(f"{role} directory {directory} is not a directory")
    files = {p.stem: p for p in sorted(directory.iterdir()) if p.suffix.lower() == ".png"}
    if not files:
        raise FileNotFoundError(f"{role} directory {directory} holds no .png label files")
    return files


def score_semantic_dirs(
    gt_dir: str | os.PathLike,
    pred_dir: str | os.PathLike,
    num_classes: int,
    ignore_index: int = 255,
    class_names: Sequence[str] | None = None,
    num_workers: int | None = None,
    output_dir: str | os.PathLike | None = None,
) -> dict:
    """Score a folder of predicted label PNGs against a folder of ground-truth label PNGs.

    Files are matched by stem (`a.png` in both folders, not recursive); PNG pixel values are the
    class ids (0..C-1, `ignore_index` for void in the ground truth). Returns the evaluator's
    `{"semantic": {...}}`. Predictions without a ground truth are ignored with a warning; a
    ground truth without a prediction, or sizes that differ, are errors.

    Each pair is decoded and counted on one of `num_workers` threads (default: CPUs, at most 4);
    PNG decoding and torch ops release the GIL. On a busy 2-core machine one thread was 8x
    slower than two: torch's intra-op threads stall when the other core is taken. `output_dir`:
    also write the confusion matrix there (`SemanticEvaluator`'s files).
    """
    from segtrain.data.codecs.image_io import read_label

    evaluator = SemanticEvaluator(num_classes, ignore_index, class_names, output_dir=output_dir)
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    gts = _png_stems(gt_dir, "ground-truth")
    preds = _png_stems(pred_dir, "prediction")
    missing = [stem for stem in gts if stem not in preds]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(gts)} ground-truth labels in {gt_dir} have no prediction in "
            f"{pred_dir} (matched by file stem), e.g. {', '.join(missing[:5])}"
        )
    extra = [stem for stem in preds if stem not in gts]
    if extra:
        warnings.warn(
            f"{len(extra)} predictions in {pred_dir} have no ground truth in {gt_dir} and are "
            f"ignored, e.g. {', '.join(extra[:5])}",
            stacklevel=2,
        )
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)

    def count(stem: str) -> torch.Tensor:
        gt, pred = read_label(gts[stem]), read_label(preds[stem])
        if gt.shape != pred.shape:
            raise ValueError(
                f"prediction {preds[stem]} is {tuple(pred.shape)} (H, W) but its ground truth "
                f"{gts[stem]} is {tuple(gt.shape)}; predictions must be at the label's size"
            )
        try:
            return compute_confusion_matrix(pred, gt, num_classes, ignore_index)
        except ValueError as err:
            raise ValueError(f"{preds[stem]} against {gts[stem]}: {err}") from err

    for counts in _bounded_map(count, gts, num_workers):
        evaluator.confusion += counts
    return evaluator.compute()
