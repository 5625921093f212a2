"""The synthetic dataset's "cells" mode: many small touching blobs, the dense-instance case.

Drawn by `SyntheticDataset(mode="cells")`, which keeps its seeding, background and targets:
only the objects differ. 1..3 cell kinds tell apart by outline (round, elongated, lobed) and
by hue; each cell has a darker rim, so that touching cells stay separable by eye.
"""

from __future__ import annotations

import math

import torch

from segtrain.data.datasets.synthetic_shapes import hsv_to_rgb

Tensor = torch.Tensor

CELL_KINDS = ("round_cell", "long_cell", "lobed_cell")
# Radius range in pixels at a 128-pixel image side (scaled with the side); small ones are more
# likely (u**2), as in a microscopy field.
_RADIUS = (4.0, 12.0)
# Centre distance >= this * (sum of radii): cells touch and their outlines overlap a little,
# yet the later cell (drawn on top) never hides most of the earlier one.
_MIN_GAP = 0.72
_TRIES = 12  # candidate centres per cell; cells without a free one are left out
_RIM = 1.2  # rim width in pixels, darkened


def _cell_inside(u: Tensor, v: Tensor, r: float, kind: int, p: list[float]) -> Tensor:
    """Bool mask of a cell of `kind` (1-based) in rotated local coordinates (u, v), radius r.

    round: aspect 0.85-1, faint wobble; long: aspect 0.45-0.65; lobed: 3-5 lobes of 15-25 %.
    """
    if kind == 1:
        aspect, wobble, lobes = 0.85 + 0.15 * p[0], 0.04 * p[1], 2
    elif kind == 2:
        aspect, wobble, lobes = 0.45 + 0.2 * p[0], 0.04 * p[1], 2
    else:
        aspect, wobble, lobes = 0.75 + 0.25 * p[0], 0.15 + 0.1 * p[1], 3 + int(3 * p[2]) % 3
    theta = torch.atan2(v, u)
    reach = r * (1.0 + wobble * torch.sin(lobes * theta + 2 * math.pi * p[3]))
    return u * u + (v / aspect) ** 2 <= reach * reach


def place_cells(radii: list[float], spots: list[list[list[float]]], size: tuple[int, int]
                ) -> tuple[list[int], list[tuple[float, float]]]:
    """Indices of the cells that found a centre, and those centres (y, x) in pixels.

    A candidate is taken when its distance to every placed centre is >= _MIN_GAP times the sum
    of radii. Candidates are drawn next to an already placed cell (half of the tries) so that
    cells form touching clusters rather than a uniform scatter.
    """
    height, width = size
    placed: list[int] = []
    centres: list[tuple[float, float]] = []
    for j, radius in enumerate(radii):
        for t, (fa, fb) in enumerate(spots[j]):
            if centres and t % 4 != 3:  # next to a random placed cell, at touching distance
                k = int(fa * len(centres)) % len(centres)
                angle = 2 * math.pi * fb
                reach = (radius + radii[placed[k]]) * (_MIN_GAP + 0.02)
                cy = centres[k][0] + reach * math.sin(angle)
                cx = centres[k][1] + reach * math.cos(angle)
            else:
                cy, cx = height * fa, width * fb
            if not (0 <= cy < height and 0 <= cx < width):
                continue
            if all((cy - py) ** 2 + (cx - px) ** 2 >= (_MIN_GAP * (radius + radii[k])) ** 2
                   for k, (py, px) in zip(placed, centres)):
                placed.append(j)
                centres.append((cy, cx))
                break
    return placed, centres


def draw_cells(ds, g: torch.Generator, image: Tensor, owner: Tensor) -> Tensor:
    """Paint the cells of one sample into `image` (float (3, H, W)) and `owner` (1 + cell
    index) in place; returns the cells' kinds (1-based), int64 (N,). `ds` is the dataset
    (its size, class count, `max_shapes` = the most cells, pixel grids)."""
    height, width = ds.size
    count = int(torch.randint(max(1, ds.max_shapes // 3), ds.max_shapes + 1, (1,), generator=g))
    kinds = torch.randint(1, ds.num_classes, (count,), generator=g)
    # Columns: radius, rotation, shape a, shape b, lobes, shading, hue jitter, saturation, value.
    params = torch.rand(count, 9, generator=g)
    spots = torch.rand(count, _TRIES, 2, generator=g)
    scale = min(height, width) / 128.0
    radii = scale * (_RADIUS[0] + (_RADIUS[1] - _RADIUS[0]) * params[:, 0] ** 2)
    placed, centres = place_cells(radii.tolist(), spots.tolist(), ds.size)
    kinds, params, radii = kinds[placed], params[placed], radii[placed]
    hues = 0.08 + (kinds - 1).float() / len(CELL_KINDS)  # a hue family per kind, 120 degrees apart
    colours = hsv_to_rgb((hues + 0.06 * (params[:, 6] - 0.5)) % 1.0,
                         0.45 + 0.4 * params[:, 7], 0.6 + 0.35 * params[:, 8])
    areas = torch.zeros(0, dtype=torch.int64)  # visible pixels of each cell so far
    for j, (kind, p) in enumerate(zip(kinds.tolist(), params.tolist())):
        cy, cx = centres[j]
        radius = float(radii[j])
        reach = 1.3 * radius + 2
        y0, y1 = max(0, int(cy - reach)), min(height, int(cy + reach) + 1)
        x0, x1 = max(0, int(cx - reach)), min(width, int(cx + reach) + 1)
        cos, sin = math.cos(2 * math.pi * p[1]), math.sin(2 * math.pi * p[1])
        dy, dx = ds._ys[y0:y1] - cy, ds._xs[:, x0:x1] - cx
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        shape = [p[2], p[3], p[4], p[5]]
        inside = _cell_inside(u, v, radius, kind, shape)
        # A cell that would hide most of one already drawn is left out: no sliver instances.
        covered = torch.bincount(owner[y0:y1, x0:x1][inside], minlength=j + 1)[1:]
        if bool((2 * covered > areas).any()):
            areas = torch.cat([areas, areas.new_zeros(1)])
            continue
        core = _cell_inside(u, v, max(radius - _RIM, 0.5), kind, shape)
        # Brighter towards the centre (a nucleus-like glow), darker on the rim.
        glow = 1.0 + 0.25 * (1.0 - (u * u + v * v).sqrt() / radius).clamp(min=0.0)
        shade = torch.where(core, glow, torch.full_like(glow, 0.55))
        patch = image[:, y0:y1, x0:x1]
        patch.copy_(torch.where(inside, colours[j].view(3, 1, 1) * shade, patch))
        owner[y0:y1, x0:x1].masked_fill_(inside, j + 1)
        areas = torch.cat([areas - covered, inside.sum().view(1)])
    return kinds  # a left-out cell has an empty mask, which the targets drop
