"""Image file names and the stems that tie an image to its predictions and its ground truth.

Torch-free: `segtrain score` matches prediction files to ground-truth images with it.
"""

from __future__ import annotations

from pathlib import PurePath

# What `segtrain predict` reads (lower case; matched case-insensitively).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


def is_image_name(name: str | PurePath) -> bool:
    """True when the name ends in one of IMAGE_SUFFIXES (any case)."""
    return PurePath(name).suffix.lower() in IMAGE_SUFFIXES


def image_stem(name: str | PurePath) -> str:
    """The stem of an image or prediction file name: folders dropped, then an image suffix
    (IMAGE_SUFFIXES, any case) dropped; another suffix is kept, so the stem "img.v2" of
    "img.v2.jpg" (or the stem itself, as dataset targets carry it) stays "img.v2"."""
    base = PurePath(str(name)).name
    return PurePath(base).stem if is_image_name(base) else base
