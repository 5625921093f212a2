"""Images per second of `segtrain predict` against a bare hand-written inference loop.

Same checkpoint (a U-Net and maskrcnn_small, each trained for one step here), same images
(synthetic shapes saved as PNG), same decoding (`read_image`), same outputs (U-Net: palette PNGs
of class ids; Mask R-CNN: a COCO results JSON with RLE masks), no overlays, same batch size and
precision. Each loop runs in a fresh process and times its loop only (model loading excluded),
predict with num_workers=0 and 2; the bare loop decodes in its main process. Rounds alternate,
medians compared. Targets: >= 0.95x the bare loop's images/s with 0 workers, > 1x with 2.

    python bench/predict.py --device cuda
    python bench/predict.py --device cpu --images 24 --size 128 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {  # name -> train overrides of its checkpoint
    "unet": ["model=unet", "dataset=synthetic"],
    "maskrcnn_small": ["model=maskrcnn_small", "dataset=synthetic_instance"],
}
_PREDICTED = re.compile(r"predicted (\d+) images in ([\d.]+) s")


def write_images(folder: Path, count: int, size: int) -> None:
    """`count` synthetic-shapes images of size x size as PNG files."""
    from segtrain.data.datasets.synthetic import SyntheticDataset
    from segtrain.data.export.semantic import export_semantic

    export_semantic(SyntheticDataset(split="val", num_samples=count, image_size=size, num_classes=6,
                                     seed=0), folder)


def train_checkpoint(work: Path, model: str) -> Path:
    """A one-step run of `model` on synthetic data; returns its last.pt."""
    run_dir = work / f"run_{model}"
    subprocess.run([sys.executable, "-m", "segtrain", "train", *MODELS[model], "trainer.max_iters=1",
                    "trainer.eval_every=0", "trainer.ckpt_every=1", "trainer.device=cpu",
                    "data.num_workers=0", "data.batch_size=2", "dataset.train.image_size=64",
                    f"hydra.run.dir={run_dir}"], check=True, capture_output=True, text=True)
    return run_dir / "checkpoints" / "last.pt"


def run_predict(ckpt: Path, images: Path, out: Path, workers: int, args: argparse.Namespace) -> float:
    """Seconds of `segtrain predict`'s loop (its own report), in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-m", "segtrain", "predict", f"ckpt={ckpt}", f"input={images}", f"output={out}",
         f"batch_size={args.batch}", f"num_workers={workers}", f"device={args.device}",
         f"precision={args.precision}", "overlay=false", f"hydra.run.dir={out}_log"],
        capture_output=True, text=True)
    found = _PREDICTED.search(result.stdout + result.stderr)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"segtrain predict failed:\n{result.stderr[-3000:]}")
    return float(found.group(2))


def run_bare(model: str, ckpt: Path, images: Path, out: Path, args: argparse.Namespace) -> float:
    """Seconds of `bare_loop`, in a fresh process (this script with --bare)."""
    result = subprocess.run(
        [sys.executable, __file__, "--bare", model, str(ckpt), str(images), str(out),
         "--batch", str(args.batch), "--device", args.device, "--precision", args.precision],
        capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"bare loop failed:\n{result.stderr[-3000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def bare_loop(name: str, ckpt: str, images: str, out: str, batch: int, device_name: str,
              precision: str) -> float:
    """What a user writes by hand: decode, normalise, forward, argmax -> PNG / threshold -> RLE."""
    import numpy as np
    import pycocotools.mask as mask_util
    import torch
    from PIL import Image

    from segtrain.data.codecs.image_io import read_image
    from segtrain.engine.evaluation import autocast_context
    from segtrain.engine.trainer_config import resolve_device
    from segtrain.utils.checkpoint import load_checkpoint

    device = resolve_device(device_name)
    model, meta = _model(load_checkpoint(ckpt), device)
    semantic = name == "unet"
    paths = sorted(Path(images).iterdir())
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    mean = torch.tensor([123.675, 116.28, 103.53], device=device).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375], device=device).view(1, 3, 1, 1)
    # VOC's label PNG palette: the class colours, VOC's void colour at 255 (an 8-bit palette PNG).
    colours = [tuple(c) for c in meta["palette"]]
    colours += [(0, 0, 0)] * (255 - len(colours)) + [(224, 224, 192)]
    palette = [c for colour in colours for c in colour]
    results = []
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(paths), batch):
            chunk = paths[first:first + batch]
            decoded = [read_image(p).to(device) for p in chunk]
            with autocast_context(device, precision):
                if semantic:
                    logits = model((torch.stack(decoded).float() - mean) / std)["out"]
                else:
                    outputs = model([image.float() / 255 for image in decoded])
            if semantic:
                for path, labels in zip(chunk, logits.float().argmax(1).byte().cpu()):
                    picture = Image.fromarray(labels.numpy())
                    picture.putpalette(palette)
                    picture.save(out_dir / f"{path.stem}.png")
                continue
            for index, output in enumerate(outputs):
                masks = (output["masks"][:, 0] > 0.5).cpu().numpy()
                rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
                boxes = output["boxes"].float().cpu()
                boxes[:, 2:] -= boxes[:, :2]
                for rle, box, score, label in zip(rles, boxes.tolist(), output["scores"].float().tolist(),
                                                  output["labels"].tolist()):
                    rle["counts"] = rle["counts"].decode("ascii")
                    results.append({"image_id": first + index, "category_id": label, "segmentation": rle,
                                    "bbox": box, "score": score})
    if not semantic:
        (out_dir / "results.json").write_text(json.dumps(results))
    return time.perf_counter() - start


def check_same_outputs(name: str, bare: Path, predicted: Path) -> None:
    """The two loops wrote the same label PNGs (byte for byte) / the same number of detections."""
    if name == "unet":
        pngs = sorted(p.name for p in bare.glob("*.png"))
        same = pngs == sorted(p.name for p in (predicted / "semantic").glob("*.png")) and all(
            (bare / n).read_bytes() == (predicted / "semantic" / n).read_bytes() for n in pngs)
    else:
        found = len(json.loads((bare / "results.json").read_text()))
        same = found == len(json.loads((predicted / "instances.json").read_text())["annotations"])
    if not same:
        raise RuntimeError(f"{name}: the bare loop and segtrain predict wrote different outputs")


def _model(ckpt: dict, device):
    """The checkpoint's model, built from its stored config (the bench's own trusted file)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(ckpt["config"])
    model = instantiate(cfg.model)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["meta"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--bare", nargs=4, metavar=("MODEL", "CKPT", "IMAGES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        print(bare_loop(*args.bare, args.batch, args.device, args.precision))
        return

    with tempfile.TemporaryDirectory(prefix="segtrain_bench_predict_") as tmp:
        work = Path(tmp)
        write_images(work / "data", args.images, args.size)
        images = work / "data" / "images"
        print(f"{args.images} PNG images of {args.size}x{args.size}, batch {args.batch}, {args.precision}, "
              f"device {args.device}")
        print(f"{'model':<16}{'bare img/s':>12}{'predict w=0':>13}{'ratio':>8}"
              f"{'predict w=2':>13}{'ratio':>8}")
        for name in args.models:
            ckpt = train_checkpoint(work, name)
            times: dict[str, list[float]] = {"bare": [], "w0": [], "w2": []}
            for r in range(args.rounds):
                times["bare"].append(run_bare(name, ckpt, images, work / f"bare_{name}_{r}", args))
                times["w0"].append(run_predict(ckpt, images, work / f"w0_{name}_{r}", 0, args))
                times["w2"].append(run_predict(ckpt, images, work / f"w2_{name}_{r}", 2, args))
            check_same_outputs(name, work / f"bare_{name}_0", work / f"w0_{name}_0")
            rate = {key: args.images / statistics.median(values) for key, values in times.items()}
            print(f"{name:<16}{rate['bare']:>12.1f}{rate['w0']:>13.1f}{rate['w0'] / rate['bare']:>8.3f}"
                  f"{rate['w2']:>13.1f}{rate['w2'] / rate['bare']:>8.3f}")


if __name__ == "__main__":
    main()
