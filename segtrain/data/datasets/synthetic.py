"""Built-in dataset of coloured shapes on textured backgrounds, generated from a seed, no files."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from segtrain.data.datasets.panoptic import masks_to_boxes, panoptic_targets
from segtrain.data.datasets.synthetic_cells import CELL_KINDS, draw_cells
from segtrain.data.datasets.synthetic_shapes import SHAPE_FNS, class_hues, hsv_to_rgb, outline_band
from segtrain.data.meta import DatasetMeta, default_palette

Tensor = torch.Tensor

# Kinds 2f+1 and 2f+2 share a hue family (see `class_hues`), so colour alone cannot reliably
# tell a circle from a rectangle or a ring from a cross: a model has to look at the shape. Each
# pair couples curved outlines with straight ones, which a small CNN learns to tell apart.
SHAPES = (
    "circle", "rectangle", "ring", "cross", "triangle", "ellipse", "star", "crescent", "hexagon",
)
MAX_CLASSES = len(SHAPES) + 1
# Instance hues are uniform within +-_HUE_JITTER / 2 of the class hue; the two kinds of a pair
# overlap on (_HUE_JITTER - _PAIR_HUE_OFFSET) / _HUE_JITTER = half of that range. The offset
# lets a model start from colour; only the shape resolves the overlap.
_HUE_JITTER, _PAIR_HUE_OFFSET = 0.08, 0.04
_PLACEMENT_TRIES = 8
_MIN_GAP = 0.7  # centre distance >= this * (sum of radii): overlaps stay partial
# Panoptic mode's stuff classes: (name, hue, saturation, value, texture). Each has its own colour
# family and texture, less saturated than the shapes, so a model can learn them from a small crop.
STUFF = (
    ("sky", 0.58, 0.40, 0.85, "gradient"),
    ("grass", 0.30, 0.50, 0.50, "speckle"),
    ("water", 0.52, 0.50, 0.55, "waves"),
    ("sand", 0.11, 0.35, 0.80, "fine_speckle"),
    ("brick", 0.02, 0.50, 0.50, "checker"),
    ("snow", 0.60, 0.05, 0.92, "flat"),
)
_MAX_STUFF_REGIONS = 3
_CROWD_SIZE = (4, 7)  # shapes in a crowd group, inclusive


class SyntheticDataset(Dataset):
    """Shapes (circle, rectangle, ring, cross, ...) drawn over smooth, striped, noisy backgrounds.

    Class 0 is background, class k >= 1 the shape kind SHAPES[k - 1]. Item i is a pure function
    of (seed, split, i): random access, loader workers and re-created datasets agree, and the
    splits differ. Later shapes occlude earlier ones; targets describe what is visible.

    Returns `(image, target)`: image `tv_tensors.Image` uint8 (3, H, W); target dict with
    `semantic` Mask int64 (H, W) in [0, num_classes) or 255 (void, only with void_border > 0:
    pixels within `void_border` pixels of a visible outline), `masks` Mask bool (N, H, W),
    `labels` int64 (N,) in [1, num_classes), `boxes` BoundingBoxes XYXY (x2/y2 exclusive: a
    mask spanning columns 3..7 has x1=3, x2=8), `iscrowd` int64 zeros (N,), `image_id` int,
    `orig_size` int64 [H, W]. `transforms(image, target)` is applied last when given.
    `kind_weights` (one per shape kind) draws the kinds by those relative frequencies, for an
    imbalanced set; None (uniform) leaves every output unchanged.

    Panoptic mode (`stuff_classes` > 0; the default 0 leaves every output above unchanged): the
    background is split into up to 3 Voronoi-like regions, each of a stuff class with its own
    colour and texture (STUFF: sky, grass, water, ...). Contiguous classes are the stuff classes
    first, then `num_classes - stuff_classes` shape kinds (things); `meta.category_ids` are
    1..num_classes. Targets follow `segtrain.data.datasets.panoptic.panoptic_targets`: `panoptic` (H, W)
    segment ids (category_id * 1000 + n, n counting that category's segments from 0; 0 =
    VOID), `segments`, and `semantic`, `masks`, `labels` (shape kind = 1 + index into
    `meta.thing_ids`), `boxes`, `iscrowd` derived from them. With probability `crowd_prob` an
    image also holds a crowd: 4..7 small shapes of one kind forming one segment with iscrowd=1,
    left out of the instance targets. `void_border` makes pixels near any segment outline
    VOID (panoptic 0, semantic 255, not in `masks`).

    Cells mode (`mode="cells"`, see `synthetic_cells.py`): instead of a few large shapes,
    max_shapes // 3 .. max_shapes small touching cells (radius 4-12 px at 128 px) of
    `num_classes - 1` (1..3) kinds, CELL_KINDS; the same targets as the shapes mode.
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: int = 256,
        image_size: int | tuple[int, int] = 128,
        num_classes: int = 6,
        max_shapes: int = 6,
        seed: int = 0,
        void_border: int = 0,
        transforms: Callable | None = None,
        stuff_classes: int = 0,
        crowd_prob: float = 0.0,
        mode: str = "shapes",
        kind_weights: Sequence[float] | None = None,
    ) -> None:
        if mode not in ("shapes", "cells"):
            raise ValueError(f"SyntheticDataset(mode={mode!r}): expected 'shapes' or 'cells'")
        if mode == "cells" and (stuff_classes or not 2 <= num_classes <= len(CELL_KINDS) + 1):
            raise ValueError(
                f"SyntheticDataset(mode='cells', num_classes={num_classes}, stuff_classes="
                f"{stuff_classes}): cells have no stuff; expected num_classes 2..{len(CELL_KINDS) + 1} "
                f"(background + up to {len(CELL_KINDS)} kinds: {', '.join(CELL_KINDS)})"
            )
        if stuff_classes:
            self._check_panoptic_args(num_classes, stuff_classes, crowd_prob)
        elif crowd_prob:
            raise ValueError(
                f"SyntheticDataset(crowd_prob={crowd_prob}): crowds are panoptic; set stuff_classes >= 1"
            )
        elif not 2 <= num_classes <= MAX_CLASSES:
            raise ValueError(
                f"SyntheticDataset(num_classes={num_classes}): expected 2..{MAX_CLASSES} "
                f"(background + up to {len(SHAPES)} shape kinds: {', '.join(SHAPES)})"
            )
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if min(height, width) < 16:
            raise ValueError(f"SyntheticDataset(image_size={image_size}): expected >= 16 pixels")
        if num_samples < 0 or max_shapes < 1 or void_border < 0:
            raise ValueError(
                f"SyntheticDataset(num_samples={num_samples}, max_shapes={max_shapes}, "
                f"void_border={void_border}): expected num_samples >= 0, max_shapes >= 1, "
                "void_border >= 0"
            )
        self.split, self.num_samples, self.seed = str(split), int(num_samples), int(seed)
        self.size = (int(height), int(width))
        self.num_classes, self.max_shapes = int(num_classes), int(max_shapes)
        self.void_border, self.transforms = int(void_border), transforms
        self.ignore_index = 255
        self.stuff_classes, self.crowd_prob = int(stuff_classes), float(crowd_prob)
        self.mode = mode
        self.kind_weights = self._checked_kind_weights(kind_weights)
        # Shape kinds are 1..K in both modes; the background is class 0 or the stuff classes.
        self._num_kinds = self.num_classes - max(self.stuff_classes, 1)
        self.meta = self._build_meta()
        self._hues = class_hues(self._num_kinds + 1, _PAIR_HUE_OFFSET)
        # Pixel-centre coordinates, shared by every sample.
        self._ys = torch.arange(height, dtype=torch.float32).view(-1, 1) + 0.5
        self._xs = torch.arange(width, dtype=torch.float32).view(1, -1) + 0.5
        self._split_key = zlib.crc32(self.split.encode())

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        index = int(index)
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} is outside [0, {self.num_samples})")
        image, target = self.generate(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _build_meta(self) -> DatasetMeta:
        kinds = list((CELL_KINDS if self.mode == "cells" else SHAPES)[: self._num_kinds])
        if not self.stuff_classes:
            return DatasetMeta(
                classes=["background", *kinds],
                palette=default_palette(self.num_classes),
                ignore_index=self.ignore_index,
                thing_ids=list(range(1, self.num_classes)),
                stuff_ids=[0],
            )
        return DatasetMeta(
            classes=[*(row[0] for row in STUFF[: self.stuff_classes]), *kinds],
            palette=default_palette(self.num_classes),
            ignore_index=self.ignore_index,
            thing_ids=list(range(self.stuff_classes, self.num_classes)),
            stuff_ids=list(range(self.stuff_classes)),
            category_ids=list(range(1, self.num_classes + 1)),  # COCO-style: no category 0
        )

    def _checked_kind_weights(self, kind_weights: Sequence[float] | None) -> Tensor | None:
        """Relative frequencies of the shape kinds (an imbalanced set); None: uniform."""
        if kind_weights is None:
            return None
        kinds = self.num_classes - 1
        weights = torch.tensor([float(w) for w in kind_weights], dtype=torch.float64)
        if self.mode != "shapes" or self.stuff_classes:
            raise ValueError(f"SyntheticDataset(kind_weights={list(kind_weights)}): only the shapes "
                             "mode draws kinds by weight; expected null in cells and panoptic modes")
        if len(weights) != kinds or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(f"SyntheticDataset(kind_weights={list(kind_weights)}): expected {kinds} "
                             f"non-negative weights, one per shape kind ({', '.join(SHAPES[:kinds])}), "
                             "not all zero")
        return weights

    @staticmethod
    def _check_panoptic_args(num_classes: int, stuff_classes: int, crowd_prob: float) -> None:
        things = num_classes - stuff_classes
        if not 1 <= stuff_classes <= len(STUFF) or not 1 <= things <= len(SHAPES):
            raise ValueError(
                f"SyntheticDataset(num_classes={num_classes}, stuff_classes={stuff_classes}): expected "
                f"1..{len(STUFF)} stuff classes ({', '.join(row[0] for row in STUFF)}) and "
                f"num_classes - stuff_classes = 1..{len(SHAPES)} shape kinds"
            )
        if not 0.0 <= crowd_prob <= 1.0:
            raise ValueError(f"SyntheticDataset(crowd_prob={crowd_prob}): expected a probability in [0, 1]")

    def generate(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        """The untransformed sample `index`."""
        g = torch.Generator().manual_seed(
            ((self.seed * 1_000_003 + self._split_key) * 10_000_019 + index) % (1 << 63)
        )
        if self.stuff_classes:
            return self._generate_panoptic(g, index)
        height, width = self.size
        image = self._background(g)
        if self.mode == "cells":
            owner = torch.zeros(height, width, dtype=torch.int64)
            kinds = draw_cells(self, g, image, owner)
            image += torch.randn(image.shape, generator=g) * 0.02
            image = (image.clamp_(0.0, 1.0) * 255.0).round_().to(torch.uint8)
            return tv_tensors.Image(image), self._target(owner, kinds, index)
        count = int(torch.randint(1, self.max_shapes + 1, (1,), generator=g))
        if self.kind_weights is None:
            kinds = torch.randint(1, self.num_classes, (count,), generator=g)
        else:
            kinds = torch.multinomial(self.kind_weights, count, replacement=True, generator=g) + 1
        # Columns: radius, rotation, proportions a and b, shading angle and strength,
        # hue jitter, saturation, value.
        params = torch.rand(count, 9, generator=g)
        spots = torch.rand(count, _PLACEMENT_TRIES, 2, generator=g)
        radii = min(height, width) * (0.10 + 0.14 * params[:, 0])
        placed, centres = self._place(radii.tolist(), spots.tolist())
        kinds, params, radii = kinds[placed], params[placed], radii[placed]
        colours = self._instance_colours(kinds, params)
        owner = torch.zeros(height, width, dtype=torch.int64)  # 1 + index of the visible shape
        for j, (kind, p) in enumerate(zip(kinds.tolist(), params.tolist())):
            self._draw_shape(image, owner, j + 1, kind, centres[j], float(radii[j]), p, colours[j])
        noise_sigma = 0.015 + 0.035 * float(torch.rand(1, generator=g))
        image += torch.randn(image.shape, generator=g) * noise_sigma
        image = (image.clamp_(0.0, 1.0) * 255.0).round_().to(torch.uint8)
        return tv_tensors.Image(image), self._target(owner, kinds, index)

    # ------------------------------------------------------------------------------ drawing
    def _background(self, g: torch.Generator) -> Tensor:
        """Float (3, H, W) in about [0, 1]: a two-colour gradient plus sinusoid stripes."""
        height, width = self.size
        r = torch.rand(11, generator=g).tolist()
        # Low saturation keeps the background from posing as a shape, yet hue varies freely.
        ends = hsv_to_rgb(
            torch.tensor([r[0], r[1]]),
            torch.tensor([0.35 * r[2], 0.35 * r[3]]),
            torch.tensor([0.25 + 0.6 * r[4], 0.25 + 0.6 * r[5]]),
        )
        angle, steepness = 2 * math.pi * r[6], 0.5 + r[7]
        t = 0.5 + steepness * (
            (self._xs / width - 0.5) * math.cos(angle) + (self._ys / height - 0.5) * math.sin(angle)
        )
        t = t.clamp(0.0, 1.0)
        image = ends[0].view(3, 1, 1) + (ends[1] - ends[0]).view(3, 1, 1) * t
        stripe_angle, cycles = 2 * math.pi * r[8], 2.0 + 10.0 * r[9]
        scale = 2 * math.pi * cycles / min(height, width)
        phase = (self._xs * math.cos(stripe_angle) + self._ys * math.sin(stripe_angle)) * scale
        return image + (0.12 * r[10]) * torch.sin(phase + 7.0 * r[10])

    def _place(
        self, radii: list[float], spots: list[list[list[float]]]
    ) -> tuple[list[int], list[tuple[float, float]]]:
        """Indices of the shapes that found a centre, and those centres (y, x) in pixels.

        Each shape takes the first of its candidate spots whose distance to every placed centre
        is at least `_MIN_GAP` times the sum of the radii, so shapes overlap but none hides
        most of another; a shape without such a spot is left out.
        """
        height, width = self.size
        placed: list[int] = []
        centres: list[tuple[float, float]] = []
        for j, radius in enumerate(radii):
            for fy, fx in spots[j]:
                cy, cx = height * (0.05 + 0.9 * fy), width * (0.05 + 0.9 * fx)
                if all(
                    (cy - py) ** 2 + (cx - px) ** 2 >= (_MIN_GAP * (radius + radii[k])) ** 2
                    for k, (py, px) in zip(placed, centres)
                ):
                    placed.append(j)
                    centres.append((cy, cx))
                    break
        return placed, centres

    def _instance_colours(self, kinds: Tensor, params: Tensor) -> Tensor:
        """RGB (N, 3) in [0, 1]: each around its class hue, saturated, with jitter."""
        hue = (self._hues[kinds] + _HUE_JITTER * (params[:, 6] - 0.5)) % 1.0
        saturation = 0.55 + 0.4 * params[:, 7]
        value = 0.55 + 0.4 * params[:, 8]
        return hsv_to_rgb(hue, saturation, value)

    def _draw_shape(
        self,
        image: Tensor,
        owner: Tensor,
        instance: int,
        kind: int,
        centre: tuple[float, float],
        radius: float,
        p: list[float],
        colour: Tensor,
    ) -> None:
        """Paint one shape into `image` and `owner` in place, over what is already there."""
        height, width = self.size
        cy, cx = centre
        y0, y1 = max(0, int(cy - radius) - 1), min(height, int(cy + radius) + 2)
        x0, x1 = max(0, int(cx - radius) - 1), min(width, int(cx + radius) + 2)
        cos, sin = math.cos(2 * math.pi * p[1]), math.sin(2 * math.pi * p[1])
        dy, dx = self._ys[y0:y1] - cy, self._xs[:, x0:x1] - cx
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        inside = SHAPE_FNS[kind - 1](u, v, radius, p[2], p[3])
        # A linear shading across the shape, so its colour is not flat.
        shade_angle, strength = 2 * math.pi * p[4], 0.3 * p[5]
        shade = 1.0 + (strength / radius) * (
            u * math.cos(shade_angle) + v * math.sin(shade_angle)
        )
        patch = image[:, y0:y1, x0:x1]
        patch.copy_(torch.where(inside, colour.view(3, 1, 1) * shade, patch))
        owner[y0:y1, x0:x1].masked_fill_(inside, instance)

    # ------------------------------------------------------------------------------ targets
    def _target(self, owner: Tensor, kinds: Tensor, index: int) -> dict[str, Any]:
        height, width = self.size
        ids = torch.arange(1, kinds.numel() + 1).view(-1, 1, 1)
        masks = owner.unsqueeze(0) == ids
        visible = masks.flatten(1).any(1)
        masks, labels = masks[visible], kinds[visible]
        semantic = torch.cat([torch.zeros(1, dtype=torch.int64), kinds])[owner]
        if self.void_border > 0 and len(masks):
            semantic[outline_band(owner, self.void_border)] = self.ignore_index
        return {
            "semantic": tv_tensors.Mask(semantic),
            "masks": tv_tensors.Mask(masks),
            "labels": labels,
            "boxes": tv_tensors.BoundingBoxes(
                masks_to_boxes(masks), format="XYXY", canvas_size=(height, width)
            ),
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
            "image_id": index,
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }

    # ------------------------------------------------------------------------------ panoptic
    def _generate_panoptic(self, g: torch.Generator, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        """Stuff regions, then an optional crowd, then the shapes (things) over them."""
        height, width = self.size
        image, stuff = self._stuff_background(g)
        owner = torch.zeros(height, width, dtype=torch.int64)  # 1 + shape index, -1 crowd, 0 stuff
        crowd_kind = 0
        if float(torch.rand(1, generator=g)) < self.crowd_prob:
            crowd_kind = self._draw_crowd(g, image, owner)
        count = int(torch.randint(1, self.max_shapes + 1, (1,), generator=g))
        kinds = torch.randint(1, self._num_kinds + 1, (count,), generator=g)
        params = torch.rand(count, 9, generator=g)  # as in `generate`
        spots = torch.rand(count, _PLACEMENT_TRIES, 2, generator=g)
        radii = min(height, width) * (0.10 + 0.14 * params[:, 0])
        placed, centres = self._place(radii.tolist(), spots.tolist())
        kinds, params, radii = kinds[placed], params[placed], radii[placed]
        colours = self._instance_colours(kinds, params)
        for j, (kind, p) in enumerate(zip(kinds.tolist(), params.tolist())):
            self._draw_shape(image, owner, j + 1, kind, centres[j], float(radii[j]), p, colours[j])
        noise_sigma = 0.015 + 0.035 * float(torch.rand(1, generator=g))
        image += torch.randn(image.shape, generator=g) * noise_sigma
        image = (image.clamp_(0.0, 1.0) * 255.0).round_().to(torch.uint8)
        return tv_tensors.Image(image), self._panoptic_target(stuff, owner, kinds, crowd_kind, index)

    def _stuff_background(self, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """Float (3, H, W) image and int64 (H, W) stuff class of 1..3 regions, distinct classes.

        Regions are the Voronoi cells of random seeds, measured in coordinates bent by a slow
        sinusoid so that the boundaries curve.
        """
        height, width = self.size
        regions = int(torch.randint(1, min(self.stuff_classes, _MAX_STUFF_REGIONS) + 1, (1,), generator=g))
        classes = torch.randperm(self.stuff_classes, generator=g)[:regions]
        seeds = torch.rand(regions, 2, 1, 1, generator=g)
        phase = (2 * math.pi * torch.rand(2, generator=g)).tolist()
        ys, xs = self._ys / height, self._xs / width
        bent_y = ys + 0.08 * torch.sin(3 * math.pi * xs + phase[0])
        bent_x = xs + 0.08 * torch.sin(3 * math.pi * ys + phase[1])
        region = ((bent_y - seeds[:, 0]) ** 2 + (bent_x - seeds[:, 1]) ** 2).argmin(0)
        image = torch.zeros(3, height, width)
        for j, stuff_class in enumerate(classes.tolist()):
            image = torch.where(region == j, self._stuff_texture(stuff_class, g), image)
        return image, classes[region]

    def _stuff_texture(self, stuff_class: int, g: torch.Generator) -> Tensor:
        """Float (3, H, W): the class's colour (jittered per image) modulated by its texture."""
        height, width = self.size
        _, hue, saturation, value, texture = STUFF[stuff_class]
        r = torch.rand(4, generator=g).tolist()
        colour = hsv_to_rgb(
            torch.tensor([(hue + 0.04 * (r[0] - 0.5)) % 1.0]),
            torch.tensor([saturation * (0.8 + 0.4 * r[1])]).clamp(max=1.0),
            torch.tensor([value * (0.85 + 0.3 * r[2])]).clamp(max=1.0),
        )[0]
        side = min(height, width)
        y, x = self._ys, self._xs
        if texture == "gradient":  # brighter towards the top, as a sky
            t = (0.3 * (0.5 - y / height)).expand(height, width)
        elif texture in ("speckle", "fine_speckle"):
            block = 3 if texture == "speckle" else 1
            noise = torch.rand(-(-height // block), -(-width // block), generator=g)
            noise = noise.repeat_interleave(block, 0).repeat_interleave(block, 1)[:height, :width]
            t = (0.4 if texture == "speckle" else 0.2) * (noise - 0.5)
        elif texture == "waves":  # horizontal ripples
            bend = 0.15 * torch.sin(4 * math.pi * x / side)
            t = 0.2 * torch.sin(2 * math.pi * (6 * y / side + bend + r[3]))
        elif texture == "checker":  # bricks: dark mortar lines, every other row offset by half a brick
            brick = max(4.0, side / 8)
            row = torch.floor(y / (brick / 2))
            shifted = x + (row % 2) * (brick / 2)
            mortar = (torch.remainder(y, brick / 2) < 1) | (torch.remainder(shifted, brick) < 1)
            t = torch.where(mortar, -0.35, 0.05)
        else:  # flat
            t = torch.zeros(height, width)
        return colour.view(3, 1, 1) * (1.0 + t)

    def _draw_crowd(self, g: torch.Generator, image: Tensor, owner: Tensor) -> int:
        """Paint a tight group of small shapes of one kind (owner -1); returns the kind."""
        height, width = self.size
        side = min(height, width)
        kind = int(torch.randint(1, self._num_kinds + 1, (1,), generator=g))
        count = int(torch.randint(_CROWD_SIZE[0], _CROWD_SIZE[1] + 1, (1,), generator=g))
        centre = (0.2 + 0.6 * torch.rand(2, generator=g)) * torch.tensor([height, width])
        offsets = (torch.rand(count, 2, generator=g) - 0.5) * (0.3 * side)
        params = torch.rand(count, 9, generator=g)
        radii = side * (0.04 + 0.03 * params[:, 0])
        colours = self._instance_colours(torch.full((count,), kind), params)
        for j in range(count):
            cy, cx = (centre + offsets[j]).tolist()
            p = params[j].tolist()
            self._draw_shape(image, owner, -1, kind, (cy, cx), float(radii[j]), p, colours[j])
        return kind

    def _panoptic_target(
        self, stuff: Tensor, owner: Tensor, kinds: Tensor, crowd_kind: int, index: int
    ) -> dict[str, Any]:
        """Segments: each stuff class present, the crowd, the visible shapes (in that order)."""
        height, width = self.size
        s, n = self.stuff_classes, len(kinds)
        # A key per segment: shapes 1..n, crowd n + 1, stuff class c n + 2 + c; 0 = VOID.
        key = torch.where(owner > 0, owner, torch.where(owner < 0, n + 1, n + 2 + stuff))
        if self.void_border > 0:
            key[outline_band(key, self.void_border)] = 0
        present = (torch.bincount(key.view(-1), minlength=n + 2 + s) > 0).tolist()
        key_class = [0, *(s + k - 1 for k in kinds.tolist()), s + crowd_kind - 1, *range(s)]
        key_id = torch.zeros(n + 2 + s, dtype=torch.int64)
        ids, classes, iscrowd = [], [], []
        per_category: dict[int, int] = {}
        for k in [*range(n + 2, n + 2 + s), n + 1, *range(1, n + 1)]:
            if not present[k]:
                continue
            category = self.meta.category_id(key_class[k])
            key_id[k] = category * 1000 + per_category.get(category, 0)
            per_category[category] = per_category.get(category, 0) + 1
            ids.append(int(key_id[k]))
            classes.append(key_class[k])
            iscrowd.append(int(k == n + 1))
        ids_t, classes_t, iscrowd_t = (torch.tensor(v, dtype=torch.int64) for v in (ids, classes, iscrowd))
        target = panoptic_targets(key_id[key], ids_t, classes_t, iscrowd_t, self.meta)
        target["image_id"] = index
        target["orig_size"] = torch.tensor([height, width], dtype=torch.int64)
        return target
