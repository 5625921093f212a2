"""Class metadata of a dataset: names, colours, thing/stuff split and dataset category ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """`n` distinct RGB colours, the same on every call; class 0 is black.

    The PASCAL VOC construction: the bits of the class id are spread, most significant first,
    over the three channels, so the first 21 colours are exactly VOC's and ids up to 2**24 - 1
    never share a colour.
    """
    if n < 0:
        raise ValueError(f"default_palette(n={n}): expected a number of classes >= 0")
    palette = []
    for index in range(n):
        rgb = [0, 0, 0]
        bits = index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
        palette.append((rgb[0], rgb[1], rgb[2]))
    return palette


@dataclass
class DatasetMeta:
    """What a model's class indices mean.

    classes: names of the contiguous train ids 0..C-1. palette: one RGB tuple per class.
    ignore_index: label value of void pixels. thing_ids / stuff_ids: contiguous ids of countable
    objects / amorphous regions (panoptic). category_ids: the dataset's own id of each contiguous
    id (e.g. COCO's 1..90 with gaps); None means the identity.
    """

    classes: list[str]
    palette: list[tuple[int, int, int]]
    ignore_index: int = 255
    thing_ids: list[int] = field(default_factory=list)
    stuff_ids: list[int] = field(default_factory=list)
    category_ids: list[int] | None = None

    def __post_init__(self) -> None:
        self.classes = [str(name) for name in self.classes]
        self.palette = [_rgb(colour, i) for i, colour in enumerate(self.palette)]
        self.ignore_index = int(self.ignore_index)
        self.thing_ids = [int(i) for i in self.thing_ids]
        self.stuff_ids = [int(i) for i in self.stuff_ids]
        if len(self.palette) != len(self.classes):
            raise ValueError(
                f"DatasetMeta has {len(self.classes)} classes but {len(self.palette)} palette "
                "colours; expected one RGB colour per class"
            )
        for name, ids in (("thing_ids", self.thing_ids), ("stuff_ids", self.stuff_ids)):
            bad = [i for i in ids if not 0 <= i < len(self.classes)]
            if bad:
                raise ValueError(
                    f"DatasetMeta.{name} holds {bad}, outside the contiguous ids "
                    f"[0, {len(self.classes)})"
                )
        if self.category_ids is not None:
            self.category_ids = [int(i) for i in self.category_ids]
            if len(self.category_ids) != len(self.classes):
                raise ValueError(
                    f"DatasetMeta has {len(self.classes)} classes but {len(self.category_ids)} "
                    "category_ids; expected one dataset category id per class"
                )
            if len(set(self.category_ids)) != len(self.category_ids):
                raise ValueError(f"DatasetMeta.category_ids repeat an id: {self.category_ids}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def category_id(self, contiguous_id: int) -> int:
        """The dataset's category id of a contiguous train id."""
        if not 0 <= contiguous_id < self.num_classes:
            raise ValueError(
                f"contiguous id {contiguous_id} is outside [0, {self.num_classes})"
            )
        if self.category_ids is None:
            return int(contiguous_id)
        return self.category_ids[contiguous_id]

    def contiguous_id(self, category_id: int) -> int:
        """The contiguous train id of a dataset category id."""
        if self.category_ids is None:
            if not 0 <= category_id < self.num_classes:
                raise KeyError(f"category id {category_id} is outside [0, {self.num_classes})")
            return int(category_id)
        try:
            return self.category_ids.index(category_id)
        except ValueError:
            raise KeyError(
                f"category id {category_id} is not one of this dataset's category_ids"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain lists of ints and strings: safe for JSON and `torch.load(weights_only=True)`."""
        return {
            "classes": list(self.classes),
            "palette": [list(colour) for colour in self.palette],
            "ignore_index": self.ignore_index,
            "thing_ids": list(self.thing_ids),
            "stuff_ids": list(self.stuff_ids),
            "category_ids": None if self.category_ids is None else list(self.category_ids),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetMeta:
        """Inverse of `to_dict`; keys other than the fields are an error."""
        unknown = sorted(set(d) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise KeyError(f"DatasetMeta.from_dict: unknown keys {unknown}")
        for key in ("classes", "palette"):
            if key not in d:
                raise KeyError(f"DatasetMeta.from_dict: missing key {key!r}")
        return cls(**d)


def _rgb(colour: Any, index: int) -> tuple[int, int, int]:
    values = tuple(int(c) for c in colour)
    if len(values) != 3 or not all(0 <= c <= 255 for c in values):
        raise ValueError(
            f"palette colour {index} is {tuple(colour)}; expected three ints in 0..255"
        )
    return values  # type: ignore[return-value]
