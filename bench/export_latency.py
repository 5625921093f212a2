"""Latency of exported models against the eager model, in the same run: eager PyTorch vs ONNX
Runtime vs TorchScript, ms per image on CPU, with the parity figures of each export.

Each preset's model is built untrained from its config (latency does not depend on the weights),
wrapped as `segtrain export` wraps it (normalisation inside; Mask R-CNN: the whole torchvision
detector on one image), exported with segtrain's own writer, loaded back with segtrain's own
runners (ONNX Runtime's CPU provider with torch's thread count), and timed on the same synthetic
validation images, batch 1, eager first then each export, median of `--runs` after `--warmup`.
Parity: max |eager - exported| of the raw outputs and the share of equal argmax pixels (semantic),
matched detections (Mask R-CNN), on those images.

    python bench/export_latency.py
    python bench/export_latency.py --runs 3 --warmup 1 --presets unet   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

PRESETS = {  # name -> train overrides (the model and the dataset whose images are timed)
    "unet": ["experiment=synthetic_unet"],
    "deeplabv3plus_r18": ["model=deeplabv3plus", "model.backbone=resnet18", "model.output_stride=32",
                          "dataset=synthetic"],
    "lraspp_mobilenet_v3": ["model=lraspp_mobilenet_v3_large", "dataset=synthetic"],
    "maskrcnn_small": ["experiment=synthetic_maskrcnn"],
}


def build(overrides: list[str]):
    """(family, eager graph, task, val images uint8 (3, H, W)) of a preset, untrained."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from segtrain.builders import build_task
    from segtrain.exporting.graphs import build_graph, family_of

    with initialize_config_module(config_module="segtrain.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "dataset.val.num_samples=8"])
    val = instantiate(cfg.dataset.val)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    task = build_task(cfg, val.meta, with_loss=False)
    family = family_of(task)
    images = [val[i][0].as_subclass(torch.Tensor) for i in range(len(val))]
    return family, build_graph(family, model, task), images


def as_input(family: str, image: torch.Tensor) -> torch.Tensor:
    return image.float() / 255.0 if family == "instance" else image[None].float()


def time_ms(run, inputs: list[torch.Tensor], warmup: int, runs: int) -> float:
    """Median ms per image of `run` over the images, `runs` passes after `warmup`."""
    with torch.no_grad():
        for _ in range(warmup):
            for x in inputs:
                run(x)
        passes = []
        for _ in range(runs):
            start = time.perf_counter()
            for x in inputs:
                run(x)
            passes.append((time.perf_counter() - start) * 1000.0 / len(inputs))
    return statistics.median(passes)


def parity(family: str, graph, run, inputs: list[torch.Tensor]) -> str:
    from segtrain.exporting.graphs import OUTPUT_NAMES
    from segtrain.exporting.parity import ParityCheck, Tolerances

    check = ParityCheck(Tolerances())
    with torch.no_grad():
        for i, x in enumerate(inputs):
            eager, exported = graph(x), run(x)
            if family == "instance":
                check.compare_detections(eager, exported, f"image {i}")
            else:
                check.compare_raw(OUTPUT_NAMES[family], eager, exported, f"image {i}")
                check.compare_predictions({"sem_seg": eager[0].argmax(1)}, {"sem_seg": exported[0].argmax(1)},
                                          f"image {i}")
    f = check.figures
    if family == "instance":
        return (f"unmatched {int(f['unmatched detections'].value)}, max abs diff: box "
                f"{f['max |diff| boxes (px)'].value:.1e} px, score {f['max |diff| scores'].value:.1e}")
    return (f"max abs diff {f['max |diff| logits'].value:.1e}, "
            f"argmax {100 * f['label map agreement'].value:.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from segtrain.exporting.graphs import METADATA_VERSION, write_graph
    from segtrain.exporting.runtime import onnx_runner, torch_runner

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets:
            family, graph, images = build(PRESETS[name])
            inputs = [as_input(family, image) for image in images]
            example = inputs[0] if family == "instance" else torch.cat([inputs[0], inputs[0]])
            metadata = {"metadata_version": METADATA_VERSION, "family": family}
            eager = time_ms(graph, inputs, args.warmup, args.runs)
            row = [name, "x".join(map(str, images[0].shape[-2:])), f"{eager:.1f}"]
            for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".ts")):
                path = Path(tmp) / f"{name}{suffix}"
                write_graph(graph, family, fmt, example, path, metadata)
                run = onnx_runner(path)[0] if fmt == "onnx" else torch_runner(path, fmt, family)
                ms = time_ms(run, inputs, args.warmup, args.runs)
                row += [f"{ms:.1f} ({eager / ms:.2f}x)", parity(family, graph, run, inputs)]
            rows.append(row)
            print(" | ".join(row), flush=True)
    header = ["preset", "input", "eager ms/img", "ONNX Runtime ms/img (speed-up)", "ORT parity",
              "TorchScript ms/img (speed-up)", "TorchScript parity"]
    print(f"\nCPU, {args.threads} threads, batch 1, {len(images)} images, median of {args.runs} passes "
          f"after {args.warmup}; torch {torch.__version__}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
