"""A GPU check in one command: training images/s of DeepLabV3-R50, DeepLabV3+-R50, Mask R-CNN
R50-FPN and Mask2Former R50, and what each common switch changes, as ratios measured in the same run.

Per model: bf16 and fp16 (autocast; fp16 with the GradScaler) against fp32; then, at the base
precision (--precision, default bf16 on a GPU that has it, else fp32), channels_last on against
off, segtrain's Trainer against a bare loop, DistributedDataParallel over one process against the
unwrapped model, and torch.compile against eager. Every loop runs the model family's own
training step (`task.training_step`) on the same in-memory batches (bench/train_overhead.py's
and bench/maskrcnn_step.py's), with AdamW and the poly schedule; images/s counts the timed steps
after --warmup ones. The Trainer row times whole runs of --steps iterations on both sides, as
bench/train_overhead.py does, so the Trainer's fixed costs (TensorBoard writer, final checkpoint)
weigh heavily in a short run. Writes a markdown table (stdout, or --output FILE.md).

    python bench/gpu.py                         # on the GPU: real sizes (512x512, 800x1333)
    python bench/gpu.py --dry-run               # any machine: stand-in small models, tiny sizes
    python bench/gpu.py --skip compile,ddp --output gpu.md
    python bench/gpu.py --models maskrcnn --steps 10   # one model (per-call time limits)
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from maskrcnn_step import make_batches as instance_batches
from torch.nn.parallel import DistributedDataParallel
from train_overhead import make_batches as semantic_batches
from train_overhead import trainer_loop

from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.engine.evaluation import autocast_context
from segtrain.engine.trainer import resolve_device
from segtrain.losses import CrossEntropyLoss
from segtrain.models.encoder_decoder import build_deeplabv3plus
from segtrain.models.mask2former.model import build_mask2former
from segtrain.models.maskrcnn import build_maskrcnn
from segtrain.models.torchvision_seg import build_torchvision_segmentation
from segtrain.optim.schedulers import poly
from segtrain.tasks.instance import InstanceTask
from segtrain.tasks.mask2former import Mask2FormerTask
from segtrain.tasks.semantic import SemanticTask

CASES = ("bf16", "fp16", "channels_last", "trainer", "ddp", "compile")
LR = 1e-4  # AdamW from scratch: small enough that no run of a few steps diverges


@dataclass
class Model:
    """One model of the check: how to build it, its task (channels_last flag) and batches."""

    key: str  # the name --models takes
    label: str
    build: Callable[[], torch.nn.Module]
    task: Callable[[bool], Any]
    batches: Callable[[], list[dict]]
    batch: int
    skip: dict[str, str] | None = None  # case -> why this model leaves it out


MODEL_KEYS = ("deeplabv3", "deeplabv3plus", "maskrcnn", "mask2former")


def _mask2former_task(channels_last: bool) -> Mask2FormerTask:
    """COCO instance mode: background + 80 thing classes (channels_last: not an option of it)."""
    names = ["background", *(f"class_{i}" for i in range(1, 81))]
    meta = DatasetMeta(names, default_palette(81), thing_ids=list(range(1, 81)), stuff_ids=[0])
    return Mask2FormerTask(meta, mode="instance")


def _mask2former_batches(n: int, batch: int, size: int, objects: int) -> list[dict]:
    return instance_batches(n, batch, size, size, objects, collate=_mask2former_task(False).collate)


def models(dry_run: bool) -> list[Model]:
    """The four models at real sizes; with `dry_run`, small stand-ins at tiny sizes (named so)."""
    classes = 19
    if dry_run:
        def semantic(channels_last: bool) -> SemanticTask:
            return SemanticTask(classes, loss=CrossEntropyLoss(), channels_last=channels_last)

        return [
            Model("deeplabv3", "DeepLabV3 (dry run: MobileNetV3-L, 2x32x32)",
                  lambda: build_torchvision_segmentation("deeplabv3_mobilenet_v3_large", classes,
                                                         aux_loss=True),
                  semantic, lambda: semantic_batches(2, 2, 32, classes), 2),
            Model("deeplabv3plus", "DeepLabV3+ (dry run: R18, 16 channels, 2x32x32)",
                  lambda: build_deeplabv3plus(classes, "resnet18", output_stride=32, channels=16),
                  semantic, lambda: semantic_batches(2, 2, 32, classes), 2),
            Model("maskrcnn", "Mask R-CNN (dry run: R18-FPN, small heads, 2x64x64)",
                  lambda: build_maskrcnn(81, "resnet18", min_size=64, max_size=64,
                                         rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                                         rpn_batch_size_per_image=32, box_batch_size_per_image=16,
                                         representation_size=32, mask_head_channels=8),
                  lambda channels_last: InstanceTask(81), lambda: instance_batches(2, 2, 64, 64, 2), 2,
                  # torchvision's detection code breaks the graph dozens of times: minutes on a CPU
                  skip={"compile": "skipped in the dry run (compiling takes minutes on a CPU)"}),
            Model("mask2former", "Mask2Former (dry run: R18, 32 channels, 10 queries, 2x64x64)",
                  lambda: build_mask2former(81, "resnet18", hidden_dim=32, num_queries=10, nheads=4,
                                            dim_feedforward=64, dec_layers=3, enc_layers=1,
                                            enc_dim_feedforward=64, mask_dim=32, num_points=256),
                  _mask2former_task, lambda: _mask2former_batches(2, 2, 64, 2), 2,
                  skip={"compile": "skipped in the dry run (compiling takes minutes on a CPU)"}),
        ]

    def cityscapes(channels_last: bool) -> SemanticTask:
        return SemanticTask(classes, loss=CrossEntropyLoss(), channels_last=channels_last)

    return [
        Model("deeplabv3", "DeepLabV3-R50 (torchvision, 8x512x512)",
              lambda: build_torchvision_segmentation("deeplabv3_resnet50", classes, aux_loss=True),
              cityscapes, lambda: semantic_batches(2, 8, 512, classes), 8),
        Model("deeplabv3plus", "DeepLabV3+-R50-D8 (8x512x512)",
              lambda: build_deeplabv3plus(classes, "resnet50", output_stride=8),
              cityscapes, lambda: semantic_batches(2, 8, 512, classes), 8),
        Model("maskrcnn", "Mask R-CNN R50-FPN (4x800x1333, 8 objects)",
              lambda: build_maskrcnn(81, "resnet50", min_size=800, max_size=1333),
              lambda channels_last: InstanceTask(81), lambda: instance_batches(2, 4, 800, 1333, 8), 4),
        Model("mask2former", "Mask2Former R50 (COCO instance, 2x1024x1024 LSJ crops, 8 objects)",
              lambda: build_mask2former(81, "resnet50"), _mask2former_task,
              lambda: _mask2former_batches(2, 2, 1024, 8), 2),
    ]


def images_per_second(model: torch.nn.Module, task: Any, batches: list[dict], device: torch.device,
                      precision: str, steps: int, warmup: int) -> float:
    """A bare training loop: autocast forward of the task's step, (scaled) backward, AdamW, poly.
    Images per second over the `steps` after `warmup` untimed ones."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    scheduler = poly(optimizer, total_iters=warmup + steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    model.train()
    images = 0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start, images = time.perf_counter(), 0
        batch = task.to_device(batches[i % len(batches)], device)
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            loss = task.training_step(model, batch)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        images += task.batch_size(batch)
    _sync(device)
    return images / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Row:
    model: str
    comparison: str
    baseline: float | str  # images/s, or why it was not measured
    variant: float | str


def check_model(spec: Model, args: argparse.Namespace, device: torch.device) -> list[Row]:
    """The six comparisons of one model (see the module docstring)."""
    torch.manual_seed(0)
    reference = spec.build().to(device)
    batches = spec.batches()

    def measure(precision: str, channels_last: bool = False, wrap: Callable | None = None) -> float:
        model = copy.deepcopy(reference)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if wrap is not None:
            model = wrap(model)
        return images_per_second(model, spec.task(channels_last), batches, device, precision,
                                 args.steps, args.warmup)

    base = args.precision
    fp32 = measure("fp32")
    measured = {"fp32": fp32}
    rows = []
    for precision in ("bf16", "fp16"):
        reason = _unsupported(precision, device) or _skipped(precision, args)
        measured[precision] = reason or measure(precision)
        label = "bf16 autocast vs fp32" if precision == "bf16" else "fp16 autocast + GradScaler vs fp32"
        rows.append(Row(spec.label, label, fp32, measured[precision]))
    at = f" ({base})"
    on_base = measured[base] if isinstance(measured[base], float) else measure(base)

    def case(name: str, label: str, run: Callable[[], float | tuple[float, float]]) -> None:
        reason = _skipped(name, args) or (spec.skip or {}).get(name)
        if reason:
            rows.append(Row(spec.label, label + at, on_base, reason))
            return
        result = run()
        baseline, variant = result if isinstance(result, tuple) else (on_base, result)
        rows.append(Row(spec.label, label + at, baseline, variant))

    case("channels_last", "channels_last on vs off", lambda: measure(base, channels_last=True))
    case("trainer", "segtrain Trainer vs bare loop",
         lambda: _trainer_vs_bare(spec, reference, batches, device, args))
    case("ddp", "DDP-wrapped (1 process) vs unwrapped", lambda: measure(base, wrap=lambda m: _ddp(m, device)))
    case("compile", "torch.compile on vs off", lambda: measure(base, wrap=torch.compile))
    return rows


def _trainer_vs_bare(spec: Model, reference: torch.nn.Module, batches: list[dict], device: torch.device,
                     args: argparse.Namespace) -> tuple[float, float]:
    """(bare, Trainer) images/s over whole runs of `--steps` iterations from fresh model copies."""
    steps, task = args.steps, spec.task(False)
    bare = images_per_second(copy.deepcopy(reference), task, batches, device, args.precision, steps, 0)
    with tempfile.TemporaryDirectory() as tmp:
        seconds = trainer_loop(copy.deepcopy(reference), task, batches, steps, device, args.precision,
                               Path(tmp), lr=LR)
    return bare, spec.batch / seconds


def _ddp(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    return DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)


def join_single_process_group(device: torch.device) -> None:
    """A process group of one (NCCL on CUDA, gloo on CPU) on a free local port, for the DDP row."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _unsupported(precision: str, device: torch.device) -> str | None:
    if precision == "fp16" and device.type == "cpu":
        # CPU autocast runs fp16 through slow fallback kernels (seconds per tiny step): no figure
        # a user could act on, and too slow for the dry run.
        return "n/a on CPU"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "n/a (no bf16 on this GPU)"
    return None


def _skipped(name: str, args: argparse.Namespace) -> str | None:
    return f"skipped (--skip {name})" if name in args.skip else None


def markdown(rows: list[Row], header: str) -> str:
    """The table: each row a baseline and a variant in images/s, and variant / baseline."""
    lines = [header, "", "| model | comparison | baseline img/s | variant img/s | variant / baseline |",
             "|---|---|---|---|---|"]
    for row in rows:
        numbers = isinstance(row.baseline, float) and isinstance(row.variant, float)
        ratio = f"{row.variant / row.baseline:.2f}x" if numbers else "-"
        lines.append(f"| {row.model} | {row.comparison} | {_cell(row.baseline)} | {_cell(row.variant)} | "
                     f"{ratio} |")
    return "\n".join(lines) + "\n"


def _cell(value: float | str) -> str:
    return f"{value:.2f}" if isinstance(value, float) else value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="base precision of the channels_last / Trainer / DDP / compile rows "
                             "(default: bf16 on a GPU with bf16, else fp32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; dry run 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 5; dry run 1)")
    parser.add_argument("--models", default=",".join(MODEL_KEYS),
                        help="comma-separated models to check (e.g. one per call on a time-limited GPU)")
    parser.add_argument("--skip", default="", help=f"comma-separated cases to leave out: {', '.join(CASES)}")
    parser.add_argument("--dry-run", action="store_true",
                        help="small stand-in models at tiny sizes and few steps: checks that it runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; dry run 1, since OpenMP threads "
                             "contending with other processes on a shared CPU slow steps many times)")
    parser.add_argument("--output", type=Path, default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    args.skip = {name for name in args.skip.split(",") if name}
    unknown = args.skip - set(CASES)
    if unknown:
        parser.error(f"--skip {','.join(sorted(unknown))}: expected names among {', '.join(CASES)}")
    args.models = [name for name in args.models.split(",") if name]
    unknown = set(args.models) - set(MODEL_KEYS)
    if unknown or not args.models:
        parser.error(f"--models {','.join(sorted(unknown))}: expected names among {', '.join(MODEL_KEYS)}")
    args.steps = args.steps or (2 if args.dry_run else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 5)
    args.threads = args.threads or (1 if args.dry_run else None)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if "ddp" not in args.skip:
        join_single_process_group(device)
    started = time.perf_counter()
    rows: list[Row] = []
    try:
        for spec in (m for m in models(args.dry_run) if m.key in args.models):
            rows += check_model(spec, args, device)
            print(f"{spec.label}: done after {time.perf_counter() - started:.0f} s", file=sys.stderr)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (f"Device {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
              f"{'dry run, ' if args.dry_run else ''}{args.steps} timed steps after {args.warmup}; "
              f"rows marked ({args.precision}) run at that precision; {time.perf_counter() - started:.0f} s "
              "in all.")
    table = markdown(rows, header)
    if args.output is not None:
        args.output.write_text(table)
    print(table, end="")
    bad = [r for r in rows for v in (r.baseline, r.variant) if isinstance(v, float) and not math.isfinite(v)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
