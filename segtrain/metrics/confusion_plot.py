"""The semantic confusion matrix kept with every evaluation: pixel counts as CSV, and a heat map of
its rows normalised (each ground-truth class's pixels: where did they go) as a PNG, also what
TensorBoard shows."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from segtrain.utils.files import write_atomically

CSV_NAME, PNG_NAME = "confusion_matrix.csv", "confusion_matrix.png"
# viridis at 0, 0.25, 0.5, 0.75, 1: dark for 0, yellow for 1; readable in grey too.
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
_MAX_SIDE = 1600  # pixels of the matrix part: 150 classes still get ~10 px a cell


def write_confusion_matrix(confusion: torch.Tensor, class_names: Sequence[str],
                           output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `confusion_matrix.csv` (header "ground truth \\ prediction" then the class names; one
    row per ground-truth class of pixel counts) and `confusion_matrix.png` into `output_dir`,
    each atomically. Returns their paths."""
    counts = confusion.detach().cpu().to(torch.int64).numpy()
    names = [str(n) for n in class_names]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["ground truth \\ prediction", *names])
    writer.writerows([name, *row.tolist()] for name, row in zip(names, counts))
    text = buffer.getvalue()
    out = Path(output_dir)
    csv_path = write_atomically(out / CSV_NAME, lambda f: f.write(text), binary=False)
    image = confusion_heatmap(confusion, names)
    png_path = write_atomically(out / PNG_NAME, lambda f: Image.fromarray(image.permute(1, 2, 0).numpy())
                                .save(f, format="PNG"), binary=True)
    return csv_path, png_path


def normalized_rows(confusion: torch.Tensor) -> torch.Tensor:
    """float64 (C, C): each row divided by its sum (rows without pixels stay 0)."""
    cm = confusion.detach().cpu().to(torch.float64)
    return cm / cm.sum(dim=1, keepdim=True).clamp(min=1)


def confusion_heatmap(confusion: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
    """uint8 (3, H, W): the row-normalised matrix in viridis, ground truth down, prediction
    across, rows labelled "k name" and columns by index k when the cells are big enough to read."""
    share = normalized_rows(confusion).numpy()
    classes = share.shape[0]
    cell = max(1, min(40, _MAX_SIDE // max(classes, 1)))
    labelled = cell >= 10
    margin_left = 8 + 7 * max(len(f"{k} {n}") for k, n in enumerate(class_names)) if labelled else 0
    margin_top = 30 if labelled else 0
    colours = _viridis(share).astype(np.uint8)  # (C, C, 3)
    matrix = np.kron(colours, np.ones((cell, cell, 1), dtype=np.uint8))
    canvas = Image.new("RGB", (margin_left + matrix.shape[1], margin_top + matrix.shape[0]), "white")
    canvas.paste(Image.fromarray(matrix), (margin_left, margin_top))
    if labelled:
        draw = ImageDraw.Draw(canvas)
        draw.text((4, 2), "rows: ground truth, columns: prediction (each row sums to 1)", fill="black")
        for k, name in enumerate(class_names):
            y = margin_top + k * cell + (cell - 10) // 2
            draw.text((4, y), f"{k} {name}", fill="black")
            draw.text((margin_left + k * cell + 1, 16), str(k), fill="black")
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def _viridis(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] -> RGB float, piecewise linear through the viridis anchors."""
    position = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    low = np.minimum(np.floor(position).astype(int), len(_ANCHORS) - 2)
    frac = (position - low)[..., None]
    return _ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac
