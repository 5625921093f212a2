"""Write miniature copies of the official VOC, VOC+SBD, Cityscapes and ADE20K layouts, for tests.

    python scripts/make_fixtures.py OUT_DIR [--which voc,voc_aug,cityscapes,ade20k]

Each writer puts a few tiny random images and label maps where the real release keeps them, with
the real file naming and PNG formats (VOC: palette class and object PNGs with a 255 border; SBD and ADE20K:
8-bit grayscale; Cityscapes: 8-bit labelIds and 16-bit instanceIds), and returns the root a
loader takes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from segtrain.data.meta import default_palette

VOC_PALETTE = default_palette(256)  # VOC's colour map: index 255 (void) is (224, 224, 192)
# Cityscapes label ids drawn into the fixtures: stuff/void ids, and thing ids with instances
# (29 = caravan has instances but no train id).
_CITYSCAPES_STUFF = (0, 1, 4, 7, 8, 9, 11, 17, 21, 23)
_CITYSCAPES_THINGS = (24, 26, 29, 33)


def write_voc(
    root: str | Path, n: int = 6, size: tuple[int, int] = (24, 32), seed: int = 0
) -> Path:
    """ROOT/VOCdevkit/VOC2012 with `n` images: the first half listed in train.txt, the rest in
    val.txt, all in trainval.txt. Masks: palette PNGs, a 1-pixel 255 border around each object;
    SegmentationClass holds classes 0..20, SegmentationObject the visible objects numbered 1..N
    in drawing order (a later object may cover part of an earlier one). Returns ROOT (the
    folder holding VOCdevkit)."""
    rng = np.random.default_rng(seed)
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    stems = [f"2007_{i:06d}" for i in range(n)]
    for stem in stems:
        _write_jpeg(voc / "JPEGImages" / f"{stem}.jpg", rng, size)
        classes, objects = _instances(rng, size, 20, border=255)
        _write_png(voc / "SegmentationClass" / f"{stem}.png", classes, palette=VOC_PALETTE)
        _write_png(voc / "SegmentationObject" / f"{stem}.png", objects, palette=VOC_PALETTE)
    half = max(1, n // 2)
    _write_list(voc / "ImageSets" / "Segmentation" / "train.txt", stems[:half])
    _write_list(voc / "ImageSets" / "Segmentation" / "val.txt", stems[half:])
    _write_list(voc / "ImageSets" / "Segmentation" / "trainval.txt", stems)
    return Path(root)


def write_voc_aug(
    root: str | Path,
    n: int = 6,
    n_aug: int = 3,
    size: tuple[int, int] = (24, 32),
    seed: int = 0,
    list_name: str = "trainaug.txt",
) -> Path:
    """`write_voc`, plus what MMSegmentation's voc_aug.py adds: `SegmentationClassAug/` grayscale
    masks (SBD's, no void border) for `n_aug` extra images and for the VOC train images (SBD
    re-annotates most of them, differently), `aug.txt` (the extra names) and `list_name`
    (VOC train + extra; "trainaug.txt" as MMSegmentation, "train_aug.txt" as DeepLab)."""
    write_voc(root, n, size, seed)
    rng = np.random.default_rng(seed + 1)
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    train = (lists / "train.txt").read_text().split()
    extra = [f"2008_{i:06d}" for i in range(n_aug)]
    for stem in extra:
        _write_jpeg(voc / "JPEGImages" / f"{stem}.jpg", rng, size)
    for stem in train + extra:
        _write_png(voc / "SegmentationClassAug" / f"{stem}.png", _objects(rng, size, 20, border=None))
    _write_list(lists / "aug.txt", extra)
    _write_list(lists / list_name, train + extra)
    return Path(root)


def write_cityscapes(
    root: str | Path,
    split: str = "val",
    cities: Sequence[str] = ("frankfurt", "lindau"),
    per_city: int = 2,
    size: tuple[int, int] = (32, 64),
    seed: int = 0,
) -> Path:
    """ROOT/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and gtFine's
    `_gtFine_labelIds.png` (8-bit label ids) and `_gtFine_instanceIds.png` (16-bit: label_id *
    1000 + n for instances, the plain label id elsewhere, incl. a car group with no instance id).
    Returns ROOT."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for city in cities:
        for k in range(per_city):
            stem = f"{city}_{k:06d}_{19 + k:06d}"
            image_path = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(image_path)
            label_ids, instance_ids = _cityscapes_maps(rng, size)
            gt = root / "gtFine" / split / city
            _write_png(gt / f"{stem}_gtFine_labelIds.png", label_ids)
            gt.mkdir(parents=True, exist_ok=True)
            Image.fromarray(instance_ids.astype(np.uint16)).save(gt / f"{stem}_gtFine_instanceIds.png")
    return root


def write_ade20k(
    root: str | Path, split: str = "validation", n: int = 3, size: tuple[int, int] = (24, 32), seed: int = 0
) -> Path:
    """ROOT/ADEChallengeData2016/{images,annotations}/{split}/ADE_{train,val}_<8 digits>.{jpg,png}:
    grayscale annotations, 0 = other, 1..150 = classes. Returns ROOT (the folder holding it)."""
    rng = np.random.default_rng(seed)
    data = Path(root) / "ADEChallengeData2016"
    tag = "train" if split == "training" else "val"
    for i in range(1, n + 1):
        stem = f"ADE_{tag}_{i:08d}"
        _write_jpeg(data / "images" / split / f"{stem}.jpg", rng, size)
        label = _objects(rng, size, 150, border=None)
        label[0, :3] = [0, 1, 150]  # both ends of the range are always present
        _write_png(data / "annotations" / split / f"{stem}.png", label)
    return Path(root)


# ------------------------------------------------------------------------------ drawing
def _objects(
    rng: np.random.Generator, size: tuple[int, int], max_class: int, border: int | None
) -> np.ndarray:
    """uint8 (H, W): background 0 with 3 rectangles of classes 1..max_class, optionally each
    framed by a 1-pixel `border` value (VOC's void outline)."""
    return _instances(rng, size, max_class, border)[0]


def _instances(
    rng: np.random.Generator, size: tuple[int, int], max_class: int, border: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """`_objects`' class map and its object map, uint8 (H, W) each: 0 background, the same
    `border` frames, and the rectangles still visible numbered 1..N in drawing order."""
    height, width = size
    label = np.zeros(size, dtype=np.uint8)
    objects = np.zeros(size, dtype=np.uint8)
    for k in range(1, 4):  # the draws as they always were: fixtures stay byte for byte the same
        y0, x0 = rng.integers(1, height - 6), rng.integers(1, width - 6)
        y1, x1 = y0 + rng.integers(4, 7), x0 + rng.integers(4, 7)
        if border is not None:
            label[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = border
            objects[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = border
        label[y0:y1, x0:x1] = rng.integers(1, max_class + 1)
        objects[y0:y1, x0:x1] = k
    visible = [k for k in np.unique(objects).tolist() if k not in (0, border)]
    renumber = np.arange(256, dtype=np.uint8)
    renumber[visible] = np.arange(1, len(visible) + 1)
    return label, renumber[objects]


def _cityscapes_maps(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    height, width = size
    label_ids = rng.choice(_CITYSCAPES_STUFF, size=size).astype(np.int64)
    instance_ids = label_ids.copy()
    for n, label_id in enumerate(_CITYSCAPES_THINGS):
        y0, x0 = rng.integers(0, height - 8), rng.integers(0, width - 8)
        y1, x1 = y0 + rng.integers(3, 8), x0 + rng.integers(3, 8)
        label_ids[y0:y1, x0:x1] = label_id
        instance_ids[y0:y1, x0:x1] = label_id * 1000 + n
    # A crowd of cars ("cargroup"): label id 26 in both maps, no instance id.
    label_ids[-2:, :4] = instance_ids[-2:, :4] = 26
    return label_ids.astype(np.uint8), instance_ids


def _write_jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, quality=90)


def _write_png(path: Path, label: np.ndarray, palette: Sequence[Sequence[int]] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8))  # mode "L": grayscale
    if palette is not None:
        image.putpalette([c for colour in palette for c in colour])  # mode "P", as VOC ships
    image.save(path)


def _write_list(path: Path, stems: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{s}\n" for s in stems))


WRITERS = {"voc": write_voc, "voc_aug": write_voc_aug, "cityscapes": write_cityscapes, "ade20k": write_ade20k}


def main(argv: Sequence[str] | None = None) -> int:
    """Write the chosen miniature datasets, each into OUT_DIR/<name>."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--which", default=",".join(WRITERS), help=f"comma-separated: {', '.join(WRITERS)}")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.which.split(",") if n.strip()]
    unknown = [n for n in names if n not in WRITERS]
    if unknown:
        parser.error(f"--which: unknown {unknown}; expected some of {', '.join(WRITERS)}")
    for name in names:
        print(f"{name}: {WRITERS[name](args.out_dir / name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
