"""Seconds per iteration of segtrain's Trainer against a bare PyTorch loop, same model and batches.

Both loops normalise uint8 images, run the model under the same autocast, take the same loss,
step the same optimizer and per-iteration scheduler over the same in-memory batches. Rounds
alternate between the two so that machine noise hits both alike; the medians are compared.
The Trainer's time includes its fixed costs (TensorBoard writer ~50 ms, final checkpoint ~20 ms
on CPU), spread over --iters iterations as they would be over a real run's.

    python bench/train_overhead.py [--precision bf16] [--device cuda] [--iters 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from segtrain.engine.evaluation import autocast_context
from segtrain.engine.trainer import Trainer, TrainerConfig, resolve_device
from segtrain.losses import CrossEntropyLoss
from segtrain.models.unet import UNet
from segtrain.optim.schedulers import poly
from segtrain.tasks.semantic import SemanticTask


class InMemoryBatches:
    """Just enough of a DataLoader for the Trainer: precomputed batches, resumable sampler API."""

    class _Sampler:
        def set_epoch(self, epoch: int, start: int = 0) -> None:
            pass

    def __init__(self, batches: list[dict]) -> None:
        self.batches, self.sampler = batches, self._Sampler()
        self.batch_size = len(batches[0]["images"])

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_batches(n: int, batch: int, size: int, classes: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "images": torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8),
            "semantic": torch.randint(0, classes, (batch, size, size), generator=g),
            "image_ids": list(range(batch)),
            "orig_sizes": torch.tensor([[size, size]] * batch),
        }
        for _ in range(n)
    ]


def bare_loop(model, task, batches, iters, device, precision) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = poly(optimizer, total_iters=iters)
    loss_fn = task.loss
    model.train()
    start = time.perf_counter()
    for i in range(iters):
        batch = task.to_device(batches[i % len(batches)], device)
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            loss = loss_fn(model(task.normalize(batch["images"]))["out"], batch["semantic"])
        loss.backward()
        optimizer.step()
        scheduler.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def trainer_loop(model, task, batches, iters, device, precision, run_dir: Path, lr: float = 1e-3) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    cfg = TrainerConfig(max_iters=iters, eval_every=0, ckpt_every=0, precision=precision,
                        device=str(device), log_every=20, keep_last=0, best_metric=None,
                        vis_images=0)
    trainer = Trainer(model, task, optimizer, poly, InMemoryBatches(batches), None, cfg, run_dir,
                      checkpoint_extra={"config": "{}", "meta": {}})
    start = time.perf_counter()
    trainer.fit()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def compare_with_bare(reference, task, batches, args, bare: Callable | None = None, warmup: int = 3,
                      lr: float = 1e-3, target: float = 1.03, header: str = "") -> None:
    """Time `bare` (default: bare_loop) and the Trainer on fresh copies of `reference`, rounds
    alternating so that machine noise hits both alike; print both medians and the ratio."""
    bare = bare or bare_loop
    device = next(reference.parameters()).device
    times: dict[str, list[float]] = {"bare": [], "segtrain": []}
    with tempfile.TemporaryDirectory() as tmp:
        bare(copy.deepcopy(reference), task, batches, warmup, device, args.precision)
        for r in range(args.rounds):
            times["bare"].append(bare(copy.deepcopy(reference), task, batches, args.iters, device,
                                      args.precision))
            times["segtrain"].append(trainer_loop(copy.deepcopy(reference), task, batches, args.iters,
                                                  device, args.precision, Path(tmp) / f"r{r}", lr=lr))
    b, t = statistics.median(times["bare"]), statistics.median(times["segtrain"])
    print(f"device {device}, precision {args.precision}, {header}, {args.iters} iters x {args.rounds} "
          f"rounds, threads {torch.get_num_threads()}")
    for name, median in (("bare", b), ("segtrain", t)):
        print(f"{name:<14} {median:.4f} s/iter  (rounds: {', '.join(f'{x:.4f}' for x in times[name])})")
    ratio = t / b
    print(f"ratio trainer/bare = {ratio:.3f} (target <= {target}): {'PASS' if ratio <= target else 'FAIL'}")


def loop_arguments(description: str, iters: int, rounds: int) -> argparse.ArgumentParser:
    """The options every bare-vs-Trainer bench takes: precision, device, iterations, rounds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--rounds", type=int, default=rounds)
    return parser


def main() -> None:
    parser = loop_arguments(__doc__.splitlines()[0], iters=100, rounds=5)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    classes = 6
    reference = UNet(num_classes=classes).to(device)
    if args.channels_last:
        reference = reference.to(memory_format=torch.channels_last)
    task = SemanticTask(classes, loss=CrossEntropyLoss(), channels_last=args.channels_last)
    batches = make_batches(8, args.batch, args.size, classes)
    compare_with_bare(reference, task, batches, args, header=f"batch {args.batch}x3x{args.size}^2")


if __name__ == "__main__":
    main()
