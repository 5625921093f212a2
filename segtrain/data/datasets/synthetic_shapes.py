"""Drawing primitives of the synthetic dataset: shape masks, class hues, HSV colours, outlines."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as nnf

Tensor = torch.Tensor


# -------------------------------------------------------------------------------- shapes
# Each takes rotated local coordinates u, v (pixels from the centre), the radius r of a circle
# that contains the shape, and two uniform numbers a, b in [0, 1) for its proportions.
def _circle(u: Tensor, v: Tensor, r: float, a: float, b: float) -> Tensor:
    return u * u + v * v <= r * r


def _ring(u: Tensor, v: Tensor, r: float, a: float, b: float) -> Tensor:
    inner = r * (0.45 + 0.15 * a)
    rr = u * u + v * v
    return (rr <= r * r) & (rr >= inner * inner)


def _rectangle(u: Tensor, v: Tensor, r: float, a: float, b: float) -> Tensor:
    # Aspect from 0.45 to 1 (a square) via the angle of the half-diagonal.
    angle = math.atan(0.45) + a * (math.pi / 4 - math.atan(0.45))
    return (u.abs() <= r * math.cos(angle)) & (v.abs() <= r * math.sin(angle))


def _cross(u: Tensor, v: Tensor, r: float, a: float, b: float) -> Tensor:
    ratio = 0.25 + 0.12 * a  # bar half-width over arm length
    arm = r / math.sqrt(1.0 + ratio * ratio)
    bar = ratio * arm
    au, av = u.abs(), v.abs()
    return ((au <= arm) & (av <= bar)) | ((au <= bar) & (av <= arm))


def _star_polygon(u: Tensor, v: Tensor, outer: float, inner: float, points: int) -> Tensor:
    """Inside a star with `points` tips at radius `outer` and notches at radius `inner`.

    A regular polygon is the star whose notches lie on its edges: inner = outer * cos(pi / n).
    """
    sector = 2 * math.pi / points
    folded = torch.remainder(torch.atan2(v, u), sector)
    folded = torch.minimum(folded, sector - folded)  # in [0, pi / points]
    rho = torch.sqrt(u * u + v * v)
    px, py = rho * torch.cos(folded), rho * torch.sin(folded)
    # Same side of the tip-to-notch edge as the centre.
    ex, ey = inner * math.cos(sector / 2) - outer, inner * math.sin(sector / 2)
    return ex * py - ey * (px - outer) >= 0


def _triangle(u: Tensor, v: Tensor, r: float, a: float, b: float) -> Tensor:
    return _star_polygon(u, v, r, r * math.cos(math.pi / 3), 3)


def _star(u: Tensor, v: Tensor, r: float, a: float, b: float) -> Tensor:
    return _star_polygon(u, v, r, r * (0.4 + 0.1 * a), 5)


def _ellipse(u: Tensor, v: Tensor, r: float, a: float, b: float) -> Tensor:
    minor = r * (0.35 + 0.2 * a)
    return (u / r) ** 2 + (v / minor) ** 2 <= 1.0


def _hexagon(u: Tensor, v: Tensor, r: float, a: float, b: float) -> Tensor:
    return _star_polygon(u, v, r, r * math.cos(math.pi / 6), 6)


def _crescent(u: Tensor, v: Tensor, r: float, a: float, b: float) -> Tensor:
    offset, bite = r * (0.4 + 0.15 * a), r * (0.75 + 0.1 * b)
    return (u * u + v * v <= r * r) & ((u - offset) ** 2 + v * v > bite * bite)


SHAPE_FNS = (
    _circle, _rectangle, _ring, _cross, _triangle, _ellipse, _star, _crescent, _hexagon,
)


# -------------------------------------------------------------------------------- helpers
def class_hues(num_classes: int, pair_offset: float) -> Tensor:
    """Hue in [0, 1) per class: kinds 2f+1 and 2f+2 sit `pair_offset` apart around family
    f's hue, and the families spread evenly round the colour wheel."""
    families = max(1, num_classes // 2)  # ceil((num_classes - 1) / 2)
    hues = torch.zeros(num_classes)
    for kind in range(1, num_classes):
        family, member = divmod(kind - 1, 2)
        paired = 2 * family + 2 < num_classes
        hues[kind] = family / families + (member - 0.5) * pair_offset * paired
    return hues % 1.0


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """(N,) hue, saturation, value in [0, 1] -> (N, 3) RGB in [0, 1]."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h.unsqueeze(-1) * 6.0) % 6.0
    weight = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return v.unsqueeze(-1) - (v * s).unsqueeze(-1) * weight


def outline_band(owner: Tensor, width: int) -> Tensor:
    """Bool (H, W): pixels within `width` (Chebyshev) of a visible outline.

    A pixel is near an outline exactly when its (2w+1)^2 window holds two different owners,
    i.e. the window max differs from the window min (two separable max-pools each). max_pool2d
    pads with -inf, so the canvas edge is not an outline.
    """
    kernel = 2 * width + 1
    o = owner.to(torch.float32)[None, None]

    def window_max(x: Tensor) -> Tensor:
        x = nnf.max_pool2d(x, (1, kernel), stride=1, padding=(0, width))
        return nnf.max_pool2d(x, (kernel, 1), stride=1, padding=(width, 0))

    return (window_max(o) != -window_max(-o))[0, 0]
