"""Resizing only the window a crop keeps: the source rows/columns behind a crop of a resized frame.

`ResizeCrop` (in `transforms.py`) resizes a Cityscapes frame by up to 2x and keeps a 512x1024
crop, so resizing the whole frame first computes up to 16x the pixels it keeps. These helpers
compute the crop of the resized frame from the source directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.functional import interpolate
from torchvision.transforms.v2 import functional as F


def nearest_indices(in_size: int, out_size: int) -> torch.Tensor:
    """Source index of each output position of a nearest resize from `in_size` to `out_size`:
    int64 (out_size,). Computed by torch's own nearest kernel (the one `F.resize` runs on masks)
    on an index ramp, so `x[..., rows, :][..., cols]` equals `F.resize(x, ...)` exactly."""
    ramp = torch.arange(in_size, dtype=torch.float32).view(1, 1, in_size, 1)
    return interpolate(ramp, size=(out_size, 1), mode="nearest").view(-1).to(torch.int64)


def take_window(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x (..., H, W) at the given source rows and columns: (..., len(rows), len(cols))."""
    x = x.index_select(-2, rows)
    # Columns by gather: index_select along the last dim is ~7x slower on CPU (measured).
    return torch.gather(x, -1, cols.expand(*x.shape[:-1], len(cols)))


def resize_window(
    image: torch.Tensor, size: list[int], top: int, left: int, height: int, width: int
) -> torch.Tensor:
    """`F.resize(image, size, antialias=True)[..., top:top+height, left:left+width]` for an image
    (..., C, H, W), computing only that window when it pays.

    When both sides grow and the image is uint8 the window is interpolated from the source rows and
    columns it needs, with torchvision's bilinear weights (half-pixel centres, edges clamped; the
    antialias filter is plain bilinear when upsampling) in float32, rounded to uint8 after each
    axis as torch's separable uint8 kernel does. torch's kernel uses fixed-point weights, so the
    result may differ from the full resize by 1 grey level on a few pixels (tests pin <= 1).
    Otherwise (a side shrinks, or float images) the whole frame is resized and cropped: exact.
    """
    in_h, in_w = image.shape[-2:]
    out_h, out_w = size
    if image.dtype != torch.uint8 or out_h < in_h or out_w < in_w:
        return F.crop(F.resize(image, size, antialias=True), top, left, height, width)
    rows, row_weights = _bilinear_taps(in_h, out_h, top, height)
    cols, col_weights = _bilinear_taps(in_w, out_w, left, width)
    # Slice the source to the rows/columns the taps touch before converting to float.
    row0, col0 = int(rows.min()), int(cols.min())
    source = image[..., row0 : int(rows.max()) + 1, col0 : int(cols.max()) + 1]
    # Contiguous float (decoders may hand over channels-last strides): gathers along W stay linear.
    source = source.to(torch.float32, memory_format=torch.contiguous_format)
    rows, cols = rows - row0, cols - col0
    # Columns by gather: index_select along the last dim is ~7x slower on CPU (measured).
    gather_shape = (*source.shape[:-1], width)
    horizontal = _weighted_sum(
        [torch.gather(source, -1, index.expand(gather_shape)) for index in cols], col_weights
    )
    vertical = _weighted_sum([horizontal.index_select(-2, index) for index in rows], row_weights[..., None])
    return vertical.to(torch.uint8)


def _weighted_sum(values: list[torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_k values[k] * weights[k], rounded half up and clamped to 0..255 (float32), as the
    fixed-point kernel's `(acc + half) >> bits` after each axis."""
    total = values[0].mul_(weights[0])
    for value, weight in zip(values[1:], weights[1:]):
        total.addcmul_(value, weight)
    return total.add_(0.5).floor_().clamp_(0, 255)


def _bilinear_taps(in_size: int, out_size: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices int64 (K, count) and normalised weights float32 (K, count) of output positions
    start..start+count-1 of an upsampling (out_size >= in_size) antialiased bilinear resize, as
    torch's `_upsample_bilinear2d_aa` computes them (support 1, window clipped to the image)."""
    scale = in_size / out_size
    center = scale * (torch.arange(start, start + count, dtype=torch.float64) + 0.5)
    first = (center - 0.5).floor().clamp(min=0)  # torch: max(int(center - support + 0.5), 0)
    stop = (center + 1.5).floor().clamp(max=in_size)  # torch: min(int(center + support + 0.5), in)
    position = first[:, None] + torch.arange(3, dtype=torch.float64)  # support 1: <= 3 pixels
    weights = (1 - (position - center[:, None] + 0.5).abs()).clamp(min=0)
    weights = torch.where(position < stop[:, None], weights, 0.0)
    weights = weights / weights.sum(1, keepdim=True)
    used = int((weights > 0).any(0).nonzero().max()) + 1  # the third tap is zero unless clipped
    # (K, count), each row contiguous: strided index tensors take torch's slow gather paths.
    index = position[:, :used].clamp(max=in_size - 1).to(torch.int64).T.contiguous()
    return index, weights[:, :used].to(torch.float32).T.contiguous()
