"""Users' own semantic segmentation data as plain folders of images and label PNGs, no code."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from segtrain.data.image_io import read_image, read_label
from segtrain.data.meta import DatasetMeta, default_palette

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
MASK_SUFFIXES = (".png",)
EXPECTED_TREE = """\
    ROOT/
      classes.yaml          (optional) names: [...], palette: [[r, g, b], ...], ignore_index: 255
      train/images/*.jpg    (.jpg .jpeg .png .tif .tiff)
      train/masks/*.png     one per image, same file stem; pixel values = class ids
      val/images/...
      val/masks/..."""
_SHOWN = 5  # stems / values named in an error message


class FolderDataset(Dataset):
    """`ROOT/{split}/images/*` with `ROOT/{split}/masks/*.png` matched by file stem.

    Classes come from the optional `ROOT/classes.yaml` (`names`, `palette`, `ignore_index` = the
    raw mask value of void pixels), else `num_classes`, else they are counted from this split's
    masks at construction (the largest value + 1, named "0", "1", ...). `label_map` remaps raw mask
    values first (e.g. {255: 1} for 0/255 binary masks, {11: 255} to make 11 void). Colour (RGB)
    masks are mapped to ids through the classes.yaml palette.

    Returns `(image, target)`: image `tv_tensors.Image` uint8 (3, H, W); target dict with
    `semantic` Mask int64 (H, W) in [0, num_classes) or `ignore_index` (void), `image_id` (the
    index), `orig_size` int64 [H, W], `file_name` (the stem). Values outside the classes and a
    mask whose size differs from its image are ValueErrors naming the file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        num_classes: int | None = None,
        ignore_index: int = 255,
        label_map: Mapping[int, int] | None = None,
        transforms: Callable | None = None,
    ) -> None:
        if root is None:
            raise ValueError(f"dataset=folder needs dataset.root=PATH, a folder laid out as\n{EXPECTED_TREE}")
        self.root, self.split = Path(root), str(split)
        self.ignore_index, self.transforms = int(ignore_index), transforms
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
        self.images, self.masks = _list_pairs(self.root, self.split)
        self.stems = sorted(self.images)
        classes = _read_classes(self.root / "classes.yaml")
        # The raw value that means void in the files; it becomes `ignore_index` in targets.
        self._raw_ignore = int(classes.get("ignore_index", self.ignore_index))
        self._palette_codes = None
        if classes.get("palette") is not None:
            self._palette_codes = torch.tensor([_code(c) for c in classes["palette"]], dtype=torch.int64)
        names = classes.get("names")
        if names is None:
            count = int(num_classes) if num_classes is not None else self._count_classes()
            names = [str(i) for i in range(count)]
        elif num_classes is not None and int(num_classes) != len(names):
            raise ValueError(
                f"dataset.num_classes={num_classes} but {self.root / 'classes.yaml'} names "
                f"{len(names)} classes; set dataset.num_classes=null to take them from the file"
            )
        palette = classes.get("palette") or default_palette(len(names))
        self.meta = DatasetMeta(classes=names, palette=palette, ignore_index=self.ignore_index,
                                stuff_ids=list(range(len(names))))
        self.num_classes = self.meta.num_classes

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        index = int(index)
        stem = self.stems[index]
        image = read_image(self.images[stem])
        semantic = self.read_mask(self.masks[stem])
        if tuple(semantic.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"{self.masks[stem]} is {tuple(semantic.shape)} (H, W) but its image "
                f"{self.images[stem].name} is {tuple(image.shape[-2:])}; a mask must match its image's size"
            )
        bad = ((semantic < 0) | (semantic >= self.num_classes)) & (semantic != self.ignore_index)
        if bad.any():
            values = torch.unique(semantic[bad]).tolist()
            raise ValueError(
                f"{self.masks[stem]}: label values {values[:_SHOWN]} are outside the "
                f"{self.num_classes} classes [0, {self.num_classes}) and not ignore_index="
                f"{self.ignore_index}; map them with dataset.label_map (e.g. '{{{values[0]}: 255}}' "
                "to ignore them) or list the classes in ROOT/classes.yaml"
            )
        target = {
            "semantic": tv_tensors.Mask(semantic),
            "image_id": index,
            "orig_size": torch.tensor(image.shape[-2:], dtype=torch.int64),
            "file_name": stem,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def read_mask(self, path: Path) -> torch.Tensor:
        """Mask file -> int64 (H, W) of class ids after `label_map`; void = `ignore_index`."""
        with Image.open(path) as pil:  # the header only: is it a colour rendering?
            colour = pil.mode in ("RGB", "RGBA")
        if colour and self._palette_codes is not None:
            labels = self._colours_to_ids(read_image(path), path)
        else:
            labels = read_label(path)  # grey-valued RGB reads as grey; other colour is an error
        if self.label_map:
            raw = labels.clone()
            for src, dst in self.label_map.items():
                labels[raw == src] = dst
        if self._raw_ignore != self.ignore_index:
            labels[labels == self._raw_ignore] = self.ignore_index
        return labels

    def _colours_to_ids(self, rgb: torch.Tensor, path: Path) -> torch.Tensor:
        codes = (rgb[0].long() << 16) | (rgb[1].long() << 8) | rgb[2].long()
        order = torch.argsort(self._palette_codes)
        sorted_codes = self._palette_codes[order]
        pos = torch.searchsorted(sorted_codes, codes).clamp_(max=len(sorted_codes) - 1)
        unknown = sorted_codes[pos] != codes
        if unknown.any():
            code = int(codes[unknown][0])
            raise ValueError(
                f"{path}: colour {(code >> 16, (code >> 8) & 255, code & 255)} is not in the palette "
                f"of {self.root / 'classes.yaml'} ({int(unknown.sum())} pixels); add it to `palette` "
                "(one colour per class) or repaint those pixels"
            )
        return order[pos]

    def _count_classes(self) -> int:
        """Largest class id in this split's masks + 1: read once, on a few threads."""
        def largest(stem: str) -> int:
            labels = self.read_mask(self.masks[stem])
            labels = labels[labels != self.ignore_index]
            return int(labels.max()) if labels.numel() else -1

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            top = max(pool.map(largest, self.stems), default=-1)
        if top < 0:
            raise ValueError(
                f"{self.root / self.split / 'masks'}: every mask pixel is void (ignore_index="
                f"{self.ignore_index}); cannot count the classes. Give dataset.num_classes or "
                "ROOT/classes.yaml"
            )
        return top + 1


def _list_pairs(root: Path, split: str) -> tuple[dict[str, Path], dict[str, Path]]:
    """Image and mask files of a split by stem; layout problems are errors showing the tree."""
    def fail(problem: str) -> FileNotFoundError | ValueError:
        kind = FileNotFoundError if "not found" in problem else ValueError
        return kind(f"dataset=folder: {problem}. Expected the layout\n{EXPECTED_TREE}\n(ROOT = {root})")

    if not root.is_dir():
        raise fail(f"dataset.root {root} not found or not a folder")
    folders = {}
    for part in ("images", "masks"):
        folder = root / split / part
        if not folder.is_dir():
            raise fail(f"{folder} not found (split '{split}')")
        folders[part] = folder
    images = _by_stem(folders["images"], IMAGE_SUFFIXES, fail)
    masks = _by_stem(folders["masks"], MASK_SUFFIXES, fail)
    if not images:
        raise fail(f"{folders['images']} holds no images")
    for what, stems, other in (("images", images.keys() - masks.keys(), folders["masks"]),
                               ("masks", masks.keys() - images.keys(), folders["images"])):
        if stems:
            shown = ", ".join(sorted(stems)[:_SHOWN]) + (", ..." if len(stems) > _SHOWN else "")
            raise fail(f"{len(stems)} {what} in {root / split / what} have no counterpart with the "
                       f"same stem in {other}: {shown}")
    return images, masks


def _by_stem(folder: Path, suffixes: tuple[str, ...], fail: Callable) -> dict[str, Path]:
    files: dict[str, Path] = {}
    stray = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):  # .DS_Store and the like
            continue
        if not path.is_file() or path.suffix.lower() not in suffixes:
            stray.append(path.name)
        elif path.stem in files:
            raise fail(f"{folder} holds both {files[path.stem].name} and {path.name}; stems must be unique")
        else:
            files[path.stem] = path
    if stray:
        shown = ", ".join(stray[:_SHOWN]) + (", ..." if len(stray) > _SHOWN else "")
        raise fail(f"{folder} holds {len(stray)} files that are not {'/'.join(suffixes)}: {shown}; "
                   "move them out")
    return files


def _read_classes(path: Path) -> dict[str, Any]:
    """classes.yaml as a dict (empty when absent), checked: names a list, one colour per name."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    expected = "expected keys names: [a, b, ...], palette: [[r, g, b], ...], ignore_index: 255"
    if not isinstance(data, dict) or set(data) - {"names", "palette", "ignore_index"}:
        raise ValueError(f"{path}: unexpected content {data!r:.200}; {expected}")
    names, palette = data.get("names"), data.get("palette")
    if names is not None and (not isinstance(names, list) or not names):
        raise ValueError(f"{path}: names is {names!r}; {expected}")
    if palette is not None:
        ok = isinstance(palette, list) and all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in palette)
        if not ok or (names is not None and len(palette) != len(names)):
            raise ValueError(f"{path}: palette must be one [r, g, b] (0..255) per name; {expected}")
        if len({tuple(c) for c in palette}) != len(palette):
            raise ValueError(f"{path}: palette repeats a colour; each class needs its own")
        if names is None:
            data["names"] = [str(i) for i in range(len(palette))]
    return data


def _code(colour: list[int]) -> int:
    return (int(colour[0]) << 16) | (int(colour[1]) << 8) | int(colour[2])

