"""Images/s of the synthetic semantic training step under DDP, against one process in the same run.

CPU (always): 2 processes (gloo, 1 thread each) against 1 process (1 thread), same per-process
batch, so perfect scaling doubles the throughput:

  scaling efficiency = throughput_2 / (2 * throughput_1)

CUDA (when present): one GPU with the model wrapped in DistributedDataParallel (a world of one,
NCCL) against the bare model: the wrapper's overhead, `time_ddp / time_plain` (1.0 = free).

Each measurement is `Trainer.train_step` (forward, loss, backward with DDP's all-reduce,
optimizer step) over a few pre-collated batches of the synthetic dataset, so data loading is not
timed; `--warmup` steps run first. On a shared or small machine the ratio is noisy: with fewer
free cores than processes it measures contention, not DDP.

    python bench/scaling.py [--batch 4] [--image-size 128] [--steps 20] [--warmup 3]
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segtrain.data.datasets.synthetic import SyntheticDataset
from segtrain.engine.monitor import Monitor
from segtrain.engine.trainer import Trainer, TrainerConfig
from segtrain.losses import CrossEntropyLoss
from segtrain.models.unet import UNet
from segtrain.tasks.semantic import SemanticTask
from segtrain.utils.distributed import barrier


def build_trainer(args: argparse.Namespace, device: str, run_dir: Path) -> tuple[Trainer, list]:
    """A Trainer over the synthetic semantic task; the batches it will step over."""
    data = SyntheticDataset(split="train", num_samples=8 * args.batch, image_size=args.image_size,
                            num_classes=6, seed=dist.get_rank() if dist.is_initialized() else 0)
    task = SemanticTask(6, loss=CrossEntropyLoss(), class_names=data.meta.classes, palette=data.meta.palette)
    torch.manual_seed(0)
    model = UNet(num_classes=6, base_channels=args.channels, depth=4, norm="bn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [task.collate([data[i] for i in range(start, start + args.batch)])
               for start in range(0, len(data), args.batch)]

    def constant(opt: torch.optim.Optimizer, total: int):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    cfg = TrainerConfig.from_dict({"max_iters": args.steps, "device": device, "vis_images": 0})
    trainer = Trainer(model, task, optimizer, constant, batches, None, cfg, run_dir)
    trainer.monitor = Monitor(run_dir, args.steps, 0, trainer.device, enabled=False)
    return trainer, batches


def images_per_second(trainer: Trainer, batches: list, args: argparse.Namespace) -> float:
    """Images/s of this process (its per-process batch), timed between barriers."""
    stream = (trainer.task.to_device(b, trainer.device) for b in itertools.cycle(batches))
    for _ in range(args.warmup):
        trainer.train_step(stream)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(stream)
    sync()
    barrier()
    return args.steps * args.batch / (time.perf_counter() - start)


def cpu_worker(rank: int, world: int, args: argparse.Namespace, tmp: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init{world}", rank=rank, world_size=world)
    try:
        trainer, batches = build_trainer(args, "cpu", Path(tmp) / f"run{world}")
        rate = images_per_second(trainer, batches, args)
        if rank == 0:
            (Path(tmp) / f"rate{world}").write_text(str(rate * world))  # all ranks step in lockstep
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cpu_scaling(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rates = {}
        for world in (1, 2):
            mp.spawn(cpu_worker, args=(world, args, tmp), nprocs=world, join=True)
            rates[world] = float((Path(tmp) / f"rate{world}").read_text())
    print(f"cpu  1 process : {rates[1]:8.2f} images/s")
    print(f"cpu  2 processes: {rates[2]:8.2f} images/s (gloo, 1 thread each)")
    print(f"scaling efficiency throughput_2 / (2 x throughput_1) = {rates[2] / (2 * rates[1]):.3f}")


def cuda_overhead(args: argparse.Namespace) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            plain, batches = build_trainer(args, "cuda", Path(tmp) / "plain")
            rate_plain = images_per_second(plain, batches, args)
            wrapped, batches = build_trainer(args, "cuda", Path(tmp) / "ddp")
            wrapped.ddp = wrapped._wrap_ddp(wrapped.model)  # a world of one: the Trainer skips it
            wrapped.forward_model = wrapped.ddp
            rate_ddp = images_per_second(wrapped, batches, args)
    finally:
        dist.destroy_process_group()
    print(f"cuda plain model: {rate_plain:8.2f} images/s")
    print(f"cuda DDP wrapper: {rate_ddp:8.2f} images/s (world of one, NCCL)")
    print(f"DDP overhead time_ddp / time_plain = {rate_plain / rate_ddp:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="images per process per step")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=16, help="U-Net base channels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    print(f"U-Net base {args.channels}, {args.image_size}px, batch {args.batch} per process, "
          f"{args.steps} timed steps after {args.warmup}")
    cpu_scaling(args)
    if torch.cuda.is_available():
        cuda_overhead(args)


if __name__ == "__main__":
    main()
