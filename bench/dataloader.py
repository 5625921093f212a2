"""Cityscapes semantic training samples per second: segtrain's pipeline against torchvision's reference.

A synthetic Cityscapes train split is written to a temporary folder first, not timed:
2048x1024 photo-like frames (smooth gradients plus noise) as PNG, as Cityscapes ships them, or
JPEG (--format jpg; the bytes keep the `_leftImg8bit.png` name both readers require, and both
sniff the format), and 8-bit labelIds maps of large regions over all 34 label ids. Then, in the
same run, over the same files and with the same number of loader workers, each sample is
decoded, mapped label id -> train id, rescaled by 0.5-2.0, padded and cropped to 512x1024 and
flipped with p = 0.5:

  segtrain   CityscapesSegmentation (torchvision.io decode, uint8 table lookup on the label map) +
             semantic_train_transforms (transforms.v2 on tensors; the resize and the crop fused
             into ResizeCrop, which resizes only the window the crop keeps)
  reference  torchvision.datasets.Cityscapes (PIL decode) + the PIL transforms of torchvision's
             references/segmentation/transforms.py, as its SegmentationPresetTrain chains them
             (RandomResize of the short side, RandomHorizontalFlip, RandomCrop, PILToTensor),
             the label ids mapped by a PIL lookup table first. Its RandomCrop takes a square
             size; here it takes (H, W), padding each side as its pad_if_smaller does.

Normalisation is left out of both by default: segtrain normalises on the device, so its
loader yields uint8. --reference-normalize adds the reference's ToDtype(float, scale=True) +
Normalize to its pipeline, as its training script runs them in the loader.

Decoded and mapped label maps (and PNG images) are checked equal on the first frames before
timing. Rounds alternate; medians compared. Torch runs --threads threads (default 1, as in
every DataLoader worker process). Target: segtrain/reference >= 1.5 (wall time). With 0 workers
the rates per CPU second of this process are printed too: steadier on a shared machine.

    python bench/dataloader.py [--images 40] [--workers 0] [--rounds 3] [--format png|jpg]
                               [--reference-normalize] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from segtrain.data.datasets.cityscapes import ID_TO_TRAIN_ID, CityscapesSegmentation
from segtrain.data.transforms.presets import semantic_train_transforms

SIZE = (1024, 2048)  # H, W of a Cityscapes frame
CROP = (512, 1024)
SCALE = (0.5, 2.0)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------ data
def write_cityscapes(root: Path, images: int, fmt: str) -> Path:
    """ROOT/leftImg8bit/train/<city>/*_leftImg8bit.png and gtFine/train/<city>/*_gtFine_labelIds.png."""
    rng = np.random.default_rng(0)
    height, width = SIZE
    ys, xs = np.mgrid[0:height, 0:width]
    for i in range(images):
        city = ("aachen", "bochum")[i % 2]
        stem = f"{city}_{i:06d}_000019"
        image_dir, gt_dir = (root / top / "train" / city for top in ("leftImg8bit", "gtFine"))
        image_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        # Smooth gradients plus noise: compresses like a photo, not like pure noise.
        base = np.stack([(xs * rng.uniform(0.1, 0.5)) % 256, (ys * rng.uniform(0.1, 0.5)) % 256,
                         ((xs + ys) * rng.uniform(0.1, 0.3)) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(image_dir / f"{stem}_leftImg8bit.png",
                                     format="JPEG" if fmt == "jpg" else "PNG",
                                     **({"quality": 90} if fmt == "jpg" else {}))
        Image.fromarray(_label_ids(rng, ys, xs)).save(gt_dir / f"{stem}_gtFine_labelIds.png")
    return root


def _label_ids(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """uint8 (H, W) label ids: sky / building / road bands with a wavy border, then rectangles
    (cars, people, poles, ...), some of ids without a train id (0..6, 9, 10, 14..16, 29, 30)."""
    height, width = ys.shape
    horizon = height * rng.uniform(0.3, 0.45) + 40 * np.sin(xs / rng.uniform(80, 300))
    label = np.where(ys < horizon, 23, np.where(ys < horizon + height * 0.2, 11, 7)).astype(np.uint8)
    label[-40:] = 1  # ego vehicle
    for label_id in rng.integers(0, 34, 25):
        h, w = rng.integers(30, 300), rng.integers(30, 500)
        y0, x0 = rng.integers(0, height - h), rng.integers(0, width - w)
        label[y0 : y0 + h, x0 : x0 + w] = label_id
    return label


# ------------------------------------------------------------------------------ reference
# references/segmentation/transforms.py, on PIL images (RandomCrop generalised to (H, W)).
def pad_if_smaller(img: Image.Image, size: tuple[int, int], fill: int = 0) -> Image.Image:
    width, height = img.size
    padh, padw = max(size[0] - height, 0), max(size[1] - width, 0)
    if padh or padw:
        img = F.pad(img, (0, 0, padw, padh), fill=fill)
    return img


class RandomResize:
    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target):
        size = random.randint(self.min_size, self.max_size)
        image = F.resize(image, size, antialias=True)
        target = F.resize(target, size, interpolation=InterpolationMode.NEAREST)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, flip_prob: float) -> None:
        self.flip_prob = flip_prob

    def __call__(self, image, target):
        if random.random() < self.flip_prob:
            image, target = F.hflip(image), F.hflip(target)
        return image, target


class RandomCrop:
    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, image, target):
        image = pad_if_smaller(image, self.size)
        target = pad_if_smaller(target, self.size, fill=255)
        crop_params = T.RandomCrop.get_params(image, self.size)
        return F.crop(image, *crop_params), F.crop(target, *crop_params)


class PILToTensor:
    def __call__(self, image, target):
        return F.pil_to_tensor(image), torch.as_tensor(np.array(target), dtype=torch.int64)


class ToDtype:
    def __call__(self, image, target):
        return F.convert_image_dtype(image, torch.float), target


class Normalize:
    def __call__(self, image, target):
        return F.normalize(image, mean=MEAN, std=STD), target


class LabelIdsToTrainIds:
    """The Cityscapes readers' id -> train id step, on the PIL label map ("L") by a lookup table."""

    def __init__(self) -> None:
        self.table = [int(t) if t >= 0 else 255 for t in ID_TO_TRAIN_ID.tolist()]

    def __call__(self, image, target):
        return image, target.point(self.table)


class Compose:
    def __init__(self, transforms: list) -> None:
        self.transforms = transforms

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


def reference_dataset(root: Path, train: bool, normalize: bool) -> Dataset:
    steps: list = [LabelIdsToTrainIds()]
    if train:  # SegmentationPresetTrain with base_size 1024 (the short side), crop 512x1024
        steps += [RandomResize(int(SCALE[0] * SIZE[0]), int(SCALE[1] * SIZE[0])),
                  RandomHorizontalFlip(0.5), RandomCrop(CROP)]
    steps.append(PILToTensor())
    if normalize:
        steps += [ToDtype(), Normalize()]
    return datasets.Cityscapes(str(root), split="train", mode="fine", target_type="semantic",
                               transforms=Compose(steps))


# ------------------------------------------------------------------------------ timing
def check_same_labels(root: Path, count: int, fmt: str) -> None:
    """Decoded + mapped label maps (and decoded PNG images) equal before augmentation."""
    ours, reference = CityscapesSegmentation(root, "train"), reference_dataset(root, False, False)
    # torchvision's Cityscapes lists files in os.listdir order; match frames by path.
    by_path = {Path(path): k for k, path in enumerate(reference.images)}
    for i in range(min(count, len(ours))):
        (image, target), (ref_image, ref_label) = ours[i], reference[by_path[ours._records[i][1]]]
        assert torch.equal(target["semantic"].as_subclass(torch.Tensor), ref_label), f"labels differ on {i}"
        assert image.shape == ref_image.shape, f"image shapes differ on {i}"
        if fmt == "png":
            assert torch.equal(image.as_subclass(torch.Tensor), ref_image), f"images differ on {i}"


def samples_per_second(dataset: Dataset, workers: int) -> tuple[float, float, torch.Tensor]:
    """Rate over one pass in wall time and in this process's CPU time (meaningful with 0
    workers: a loaded, shared machine stretches wall time far more than CPU time), and the
    histogram of the train ids it produced (256 bins)."""
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=lambda batch: batch)
    histogram = torch.zeros(256, dtype=torch.int64)
    count = 0
    start, start_cpu = time.perf_counter(), time.process_time()
    for batch in loader:
        for image, target in batch:
            label = target["semantic"] if isinstance(target, dict) else target
            assert tuple(image.shape[-2:]) == CROP == tuple(label.shape[-2:])
            histogram += torch.bincount(label.reshape(-1), minlength=256)
            count += 1
    return count / (time.perf_counter() - start), count / (time.process_time() - start_cpu), histogram


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--format", default="png", choices=["png", "jpg"])
    parser.add_argument("--reference-normalize", action="store_true",
                        help="add ToDtype(float) + Normalize to the reference, as its loader runs them")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = write_cityscapes(Path(tmp), args.images, args.format)
        check_same_labels(root, 3, args.format)
        # cat_max_ratio=1 (off): the reference has no MMSeg-style crop retries.
        ours = CityscapesSegmentation(root, "train", transforms=semantic_train_transforms(
            hflip_prob=0.5, scale_range=SCALE, crop_size=CROP, cat_max_ratio=1.0))
        reference = reference_dataset(root, True, args.reference_normalize)
        fast, slow, fast_cpu, slow_cpu = [], [], [], []
        hist_ours, hist_ref = torch.zeros(256, dtype=torch.int64), torch.zeros(256, dtype=torch.int64)
        for _ in range(args.rounds):
            rate, cpu_rate, hist = samples_per_second(ours, args.workers)
            fast.append(rate)
            fast_cpu.append(cpu_rate)
            hist_ours += hist
            rate, cpu_rate, hist = samples_per_second(reference, args.workers)
            slow.append(rate)
            slow_cpu.append(cpu_rate)
            hist_ref += hist
    f, s = statistics.median(fast), statistics.median(slow)
    print(f"{args.images} {args.format.upper()} frames {SIZE[1]}x{SIZE[0]} -> crop {CROP[1]}x{CROP[0]}, "
          f"scale {SCALE[0]}-{SCALE[1]}, flip 0.5, {args.workers} workers, {args.rounds} rounds, "
          f"torch threads {torch.get_num_threads()}, reference normalises: {args.reference_normalize}")
    print(f"segtrain   {f:7.2f} samples/s  (rounds: {', '.join(f'{x:.2f}' for x in fast)})")
    print(f"reference  {s:7.2f} samples/s  (rounds: {', '.join(f'{x:.2f}' for x in slow)})")
    share_ours, share_ref = (h.double() / h.sum() for h in (hist_ours, hist_ref))
    present = [k for k in range(256) if hist_ours[k] or hist_ref[k]]
    print("train-id pixel share over all rounds, segtrain/reference: " + ", ".join(
        f"{k}: {share_ours[k]:.3f}/{share_ref[k]:.3f}" for k in present))
    if args.workers == 0:
        f_cpu, s_cpu = statistics.median(fast_cpu), statistics.median(slow_cpu)
        print(f"per CPU second (this process): segtrain {f_cpu:.2f}, reference {s_cpu:.2f} samples; "
              f"ratio {f_cpu / s_cpu:.2f}")
    ratio = f / s
    print(f"segtrain/reference = {ratio:.2f} (target >= 1.5): {'PASS' if ratio >= 1.5 else 'FAIL'}")


if __name__ == "__main__":
    main()
