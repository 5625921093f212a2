"""The parity check of `segtrain export`: an exported graph against the eager model on the same
images, on raw scores (max absolute difference) and on the task's predictions (equal label
maps, matched detections). Plain tensors in, a list of checked figures out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.ops import box_iou

from segtrain.exporting.graphs import OUTPUT_NAMES


@dataclass(frozen=True)
class Tolerances:
    """atol: scores, logits and mask probabilities; box_atol: box corners in pixels;
    min_agreement: share of pixels whose predicted label (or panoptic segment) must be equal;
    match_iou: box IoU (same label) at which two detections are the same object."""

    atol: float = 1e-3
    box_atol: float = 0.5
    min_agreement: float = 0.999
    match_iou: float = 0.5


@dataclass
class Figure:
    """One checked figure: its worst value over the images, the limit, where the worst was."""

    name: str
    value: float
    limit: float
    at_most: bool  # True: value <= limit passes; False: value >= limit passes
    where: str = ""

    @property
    def ok(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def merge(self, value: float, where: str) -> None:
        """Keep the worse of the current value and `value`."""
        if (value > self.value) if self.at_most else (value < self.value):
            self.value, self.where = value, where


class ParityCheck:
    """Accumulates the figures of `compare_raw`, `compare_predictions`, `compare_detections`."""

    def __init__(self, tolerances: Tolerances) -> None:
        self.tol = tolerances
        self.figures: dict[str, Figure] = {}

    def _record(self, name: str, value: float, limit: float, at_most: bool, where: str) -> None:
        if name not in self.figures:
            self.figures[name] = Figure(name, value, limit, at_most, where)
        else:
            self.figures[name].merge(value, where)

    def compare_raw(self, names: Sequence[str], eager: Sequence[torch.Tensor],
                    exported: Sequence[torch.Tensor], where: str) -> None:
        """Max |eager - exported| of each raw output (same shapes required)."""
        for name, a, b in zip(names, eager, exported):
            if a.shape != b.shape:
                raise ValueError(f"{name}: the exported graph gives shape {list(b.shape)} where the "
                                 f"eager model gives {list(a.shape)} ({where})")
            self._record(f"max |diff| {name}", _max_abs(a, b), self.tol.atol, True, where)

    def compare_predictions(self, eager: dict[str, Any], exported: dict[str, Any], where: str) -> None:
        """The contract's predictions of one image: label maps (`sem_seg`) and panoptic segment
        maps must agree on `min_agreement` of the pixels."""
        if "sem_seg" in eager:
            self._record("label map agreement", _agreement(eager["sem_seg"], exported["sem_seg"]),
                         self.tol.min_agreement, False, where)
        if "panoptic" in eager:
            self._record("panoptic map agreement", _agreement(eager["panoptic"], exported["panoptic"]),
                         self.tol.min_agreement, False, where)

    def compare_detections(self, eager: Sequence[torch.Tensor], exported: Sequence[torch.Tensor],
                           where: str) -> None:
        """Raw detections of one image (boxes, labels, scores, masks), matched greedily in the
        eager model's score order: same label, box IoU >= match_iou. Every detection must find its
        match; matched pairs differ by at most box_atol (boxes) and atol (scores, mask probabilities)."""
        a = dict(zip(OUTPUT_NAMES["instance"], eager))
        b = dict(zip(OUTPUT_NAMES["instance"], exported))
        pairs = match_detections(a, b, self.tol.match_iou)
        unmatched = len(a["scores"]) + len(b["scores"]) - 2 * len(pairs)
        self._record("unmatched detections", float(unmatched), 0.0, True,
                     f"{where}: {len(a['scores'])} eager, {len(b['scores'])} exported")
        if pairs:
            i = torch.tensor([p[0] for p in pairs])
            j = torch.tensor([p[1] for p in pairs])
            self._record("max |diff| boxes (px)", _max_abs(a["boxes"][i], b["boxes"][j]), self.tol.box_atol,
                         True, where)
            self._record("max |diff| scores", _max_abs(a["scores"][i], b["scores"][j]), self.tol.atol, True,
                         where)
            if a["masks"][i].shape == b["masks"][j].shape:
                self._record("max |diff| masks", _max_abs(a["masks"][i], b["masks"][j]), self.tol.atol,
                             True, where)

    def absorb(self, other: ParityCheck) -> None:
        """Add the figures of another check (the worse value of each wins)."""
        for figure in other.figures.values():
            self._record(figure.name, figure.value, figure.limit, figure.at_most, figure.where)

    def failures(self) -> list[Figure]:
        return [figure for figure in self.figures.values() if not figure.ok]

    def table(self) -> str:
        """Aligned lines: figure, value, limit, ok/FAIL, where the worst value was."""
        rows = [(f.name, _show(f.name, f.value), ("<= " if f.at_most else ">= ") + _show(f.name, f.limit),
                 "ok" if f.ok else "FAIL", f.where) for f in self.figures.values()]
        widths = [max(len(row[k]) for row in rows) for k in range(4)]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + f"  {row[4]}"
                         for row in rows)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: {"value": f.value, "limit": f.limit, "ok": f.ok, "where": f.where}
                for f in self.figures.values()}


def match_detections(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                     min_iou: float) -> list[tuple[int, int]]:
    """Greedy pairs (i in a, j in b): a's detections in score order, each with the unmatched b
    detection of the same label and highest box IoU >= min_iou."""
    if not len(a["scores"]) or not len(b["scores"]):
        return []
    iou = box_iou(a["boxes"].float(), b["boxes"].float())
    iou[a["labels"][:, None] != b["labels"][None, :]] = -1.0
    pairs, taken = [], torch.zeros(len(b["scores"]), dtype=torch.bool)
    for i in torch.argsort(a["scores"], descending=True, stable=True).tolist():
        row = iou[i].masked_fill(taken, -1.0)
        j = int(row.argmax())
        if float(row[j]) >= min_iou:
            pairs.append((i, j))
            taken[j] = True
    return pairs


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu()
    if a.shape != b.shape:
        return 0.0
    return float((a == b).float().mean()) if a.numel() else 1.0


def _show(name: str, value: float) -> str:
    if "agreement" in name:
        return f"{100 * value:.3f}%"
    if name == "unmatched detections":
        return str(int(value))
    return f"{value:.3g}"
