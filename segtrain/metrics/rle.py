"""COCO RLE encoding of masks that are zero outside known boxes, reading only the boxes.

`encode_in_boxes` gives byte-for-byte what `pycocotools.mask.encode` gives on the full masks;
`tight_boxes` computes boxes it can use. torch is imported only inside `tight_boxes`, so scoring
a results file stays torch-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pycocotools.mask as mask_util


def _clamped_boxes(boxes: Any, num: int, height: int, width: int) -> np.ndarray:
    """int64 (N, 4) boxes clipped to the image, x1 >= x0 and y1 >= y0."""
    boxes = np.asarray(boxes)
    if boxes.shape != (num, 4) or not (np.issubdtype(boxes.dtype, np.integer) or boxes.size == 0):
        raise ValueError(f"boxes are {boxes.dtype} {boxes.shape}; expected integer (N, 4) = ({num}, 4) "
                         "x0, y0, x1, y1 pixel boxes (exclusive end), e.g. from tight_boxes")
    boxes = boxes.astype(np.int64)
    x0, x1 = np.clip(boxes[:, 0], 0, width), np.clip(boxes[:, 2], 0, width)
    y0, y1 = np.clip(boxes[:, 1], 0, height), np.clip(boxes[:, 3], 0, height)
    return np.stack([x0, y0, np.maximum(x1, x0), np.maximum(y1, y0)], axis=1)


def encode_in_boxes(masks: np.ndarray, boxes: np.ndarray) -> list[dict]:
    """RLEs of masks that are zero outside their boxes, identical to pycocotools' `encode`.

    masks: bool/uint8 (N, H, W); boxes: integer (N, 4) x0, y0, x1, y1 (exclusive end), clipped to
    the image here; each mask must be zero outside its box (not checked: that would read every
    pixel, which is what this function avoids). Returns N dicts {"size": [H, W], "counts": str}.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks have shape {masks.shape}; expected (N, H, W)")
    num, height, width = masks.shape
    boxes = _clamped_boxes(boxes, num, height, width)
    if num == 0:
        return []
    # Same conversion as encode_masks: a view for bool, no copy for uint8.
    masks = masks.view(np.uint8) if masks.dtype == np.bool_ else masks.astype(np.uint8, copy=False)
    x0, y0, x1, y1 = boxes.T
    col_len = y1 - y0 + 2  # each box column with one 0 above and below: runs never span two columns
    sizes = (x1 - x0) * col_len
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    buf = np.zeros(int(offsets[-1]), np.uint8)
    for i in np.flatnonzero((x1 > x0) & (y1 > y0)).tolist():
        region = buf[offsets[i]:offsets[i + 1]].reshape(x1[i] - x0[i], col_len[i])
        region[:, 1:-1] = masks[i, y0[i]:y1[i], x0[i]:x1[i]].T
    # Boundary b: a run starts at buf[b + 1]. The pads keep every boundary inside its mask's region.
    bounds = np.flatnonzero(buf[1:] != buf[:-1])
    owner = np.searchsorted(offsets, bounds, side="right") - 1  # empty regions share the next's offset
    col, row = np.divmod(bounds - offsets[owner], col_len[owner])
    # Column-major position in the full image of the run's first pixel (row == box height: below it).
    pos = (x0[owner] + col) * height + y0[owner] + row
    keep = pos < height * width  # a run ending at the image's end is closed by the final count
    # A box spanning the full height puts a column's bottom boundary and the next column's top
    # boundary at the same position: values v (bottom) and u (top), both non-zero. pycocotools
    # sees v followed by u: no boundary when v == u (the runs merge), one when they differ.
    same = np.flatnonzero((pos[1:] == pos[:-1]) & (owner[1:] == owner[:-1]))
    keep[same + 1] = False
    keep[same[buf[bounds[same]] == buf[bounds[same + 1] + 1]]] = False
    pos, owner = pos[keep], owner[keep]
    # Per mask: counts = differences of [0, pos..., H*W], laid out as one array for all masks.
    per_mask = np.bincount(owner, minlength=num)
    starts = np.concatenate([[0], np.cumsum(per_mask + 2)[:-1]])
    edges = np.empty(len(pos) + 2 * num, np.int64)
    edges[starts] = 0
    edges[starts + per_mask + 1] = height * width
    edges[np.arange(len(pos)) + 2 * owner + 1] = pos
    diffs = np.diff(edges)
    # frPyObjects compresses uncompressed RLE dicts (counts as any integer sequence) like encode.
    rles = mask_util.frPyObjects(
        [{"size": [height, width], "counts": diffs[s:s + n + 1]}
         for s, n in zip(starts.tolist(), per_mask.tolist())], height, width)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def tight_boxes(masks: Any) -> Any:
    """Boxes of masks' non-zero pixels: bool (N, H, W) tensor -> int64 (N, 4) x0, y0, x1, y1
    (exclusive end) on the masks' device; (0, 0, 0, 0) for an empty mask."""
    import torch  # here, not at module level: `segtrain score` must not import torch

    num, height, width = masks.shape
    if height == 0 or width == 0:
        return torch.zeros((num, 4), dtype=torch.int64, device=masks.device)
    # max over uint8 is any over bool, but ~10x faster on CPU (torch 2.14's bool `any` is not
    # vectorised there): 1-2 ms instead of 12-16 ms for 48 masks of 480x640.
    flags = masks.view(torch.uint8) if masks.dtype == torch.bool else (masks != 0).view(torch.uint8)
    rows, cols = flags.amax(dim=2) > 0, flags.amax(dim=1) > 0  # (N, H), (N, W)

    def span(hit: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(length, device=hit.device)
        first = torch.where(hit, index, length).amin(dim=1)
        end = torch.where(hit, index + 1, 0).amax(dim=1)
        return first, end

    (xa, xb), (ya, yb) = span(cols, width), span(rows, height)
    boxes = torch.stack([xa, ya, xb, yb], dim=1)
    return torch.where(cols.any(dim=1, keepdim=True), boxes, 0)
