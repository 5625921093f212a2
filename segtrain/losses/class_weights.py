"""Class weights from the training set's pixel shares, for `loss.class_weights=auto`.

`median_frequency` (Eigen & Fergus 2015, SegNet's choice; `auto` means this): w_c = median(f) /
f_c, with f_c the share of class c among labelled pixels, so a median class weighs 1 and a class
at 1% of a 50% median weighs 50. `inverse`: w_c = 1 / f_c normalised to mean 1 over the present
classes. A class with no pixel gets weight 0 (it cannot be learned and must not explode).

Counting reads the training label maps once, without augmentation: all of them up to
`MAX_IMAGES`, else that many evenly spaced ones (shares of a large set are estimated; 2000 of
ADE20k's 20210 images). The counts are cached by the dataset's resolved config under segtrain's
cache directory (never in the dataset folder), so a second run starts at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

import torch

from segtrain.data.datasets.label_scan import cache_dir, untransformed
from segtrain.utils.files import write_atomically

log = logging.getLogger(__name__)
MODES = ("auto", "median_frequency", "inverse")
MAX_IMAGES = 2000


def balanced_weights(counts: torch.Tensor, mode: str = "median_frequency") -> torch.Tensor:
    """float32 (C,) weights from int (C,) pixel counts (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"class_weights={mode!r}; expected a list of weights or one of {', '.join(MODES)}")
    counts = counts.to(torch.float64)
    present = counts > 0
    if not bool(present.any()):
        raise ValueError("class_weights=auto: the training set has no labelled pixel")
    share = counts / counts.sum()
    weights = torch.zeros_like(share)
    if mode == "inverse":
        weights[present] = 1.0 / share[present]
        weights /= weights[present].mean()
    else:
        weights[present] = share[present].median() / share[present]
    return weights.to(torch.float32)


def class_pixel_counts(dataset: Any, num_classes: int, ignore_index: int, key: str,
                       progress: Callable[[int, int], None] | None = None,
                       max_images: int = MAX_IMAGES) -> torch.Tensor:
    """int64 (C,) labelled pixels per class over `dataset`'s `semantic` targets (at most
    `max_images` evenly spaced items), read with its transforms off; cached under `key` (a
    description of the data: its resolved config)."""
    total = len(dataset)
    indices = (list(range(total)) if total <= max_images
               else [i * total // max_images for i in range(max_images)])
    digest = hashlib.sha256(f"{key}|{num_classes}|{ignore_index}|{len(indices)}".encode()).hexdigest()[:24]
    path = cache_dir() / "class_pixels" / f"{digest}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())["counts"]
            if len(cached) == num_classes:
                return torch.tensor(cached, dtype=torch.int64)
        except (OSError, ValueError, KeyError):
            pass  # an unreadable cache is recounted
    counts = torch.zeros(num_classes, dtype=torch.int64)
    with untransformed(dataset):
        for done, i in enumerate(indices, 1):
            _, target = dataset[i]
            if "semantic" not in target:
                raise ValueError("class_weights=auto counts the training set's `semantic` label maps; "
                                 f"this dataset's items have {sorted(target)}")
            labels = torch.as_tensor(target["semantic"]).reshape(-1).long()
            labels = labels[(labels != ignore_index) & (labels >= 0) & (labels < num_classes)]
            counts += torch.bincount(labels, minlength=num_classes)
            if progress is not None:
                progress(done, len(indices))
    try:
        write_atomically(path, lambda f: f.write(json.dumps({"key": key, "counts": counts.tolist()})),
                         binary=False)
    except OSError as err:  # a read-only cache: counted again next time
        log.debug("class pixel counts not cached at %s: %s", path, err)
    return counts
