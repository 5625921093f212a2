"""Seconds per Mask2Former training step: segtrain's against Hugging Face transformers'
Mask2FormerForUniversalSegmentation with the same configuration, in the same run.

The paper's full model (Cheng et al., 2022): R50 backbone, 6-layer deformable pixel decoder,
hidden 256, 100 queries, dec_layers 10 (9 masked-attention layers), 12544 points, deep
supervision; 150 classes (ADE20K), batch 2 of 512x512 crops, each image with `--segments` random
ellipse segments. Both from random init (no download): ours torchvision's ResNet-50, theirs
transformers' ResNetBackbone (the same 44.0M parameters). A step is forward + all losses +
backward + AdamW step; rounds alternate between the two models, the first step of each is a
warm-up and is dropped; printed: the ratio of the medians, the median of each round's ratio and
the ratio of the fastest steps (the last two robust to a machine whose load changes between
rounds). Target: ours / theirs <= 1.0.

Peak memory per image: each model runs 2 training steps in a fresh subprocess, at batch 1 and at
batch 2; the kernel's peak-RSS mark (VmHWM in /proc/self/status, reset through
/proc/self/clear_refs once the model, batch and optimizer exist) minus the RSS at that moment,
divided by the batch, and the per-image slope (batch 2 - batch 1), which leaves out the
batch-independent part (gradients, AdamW's state).

    python bench/mask2former_step.py                  # CPU, 2 threads, 6 rounds of 1 step
    python bench/mask2former_step.py --dry-run        # tiny model and images, seconds
    python bench/mask2former_step.py --profile ours   # where our step's time goes (torch.profiler)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch

CLASSES = 150


def _status_mib(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False if not
    allowed, and the peak then includes what building the model took."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def config(args: argparse.Namespace) -> dict:
    if args.dry_run:
        return dict(hidden_dim=64, num_queries=10, nheads=4, dim_feedforward=128, dec_layers=3,
                    enc_layers=1, enc_dim_feedforward=128, mask_dim=64, num_points=256)
    return dict(hidden_dim=256, num_queries=100, nheads=8, dim_feedforward=2048, dec_layers=10,
                enc_layers=6, enc_dim_feedforward=1024, mask_dim=256, num_points=112 * 112)


def build(which: str, args: argparse.Namespace) -> torch.nn.Module:
    c = config(args)
    if which == "ours":
        from segtrain.models.mask2former.model import build_mask2former

        return build_mask2former(CLASSES, backbone="resnet18" if args.dry_run else "resnet50", **c)
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "resnet is not a supported backbone": it is what we compare
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if args.dry_run:  # ResNet-18
        backbone = ResNetConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
                                out_features=stages)
    else:  # ResNet-50
        backbone = ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                                layer_type="bottleneck", out_features=stages)
    cfg = Mask2FormerConfig(
        backbone_config=backbone, num_labels=CLASSES, feature_size=c["hidden_dim"],
        hidden_dim=c["hidden_dim"], mask_feature_size=c["mask_dim"], num_queries=c["num_queries"],
        num_attention_heads=c["nheads"], dim_feedforward=c["dim_feedforward"],
        decoder_layers=c["dec_layers"], encoder_layers=c["enc_layers"],
        encoder_feedforward_dim=c["enc_dim_feedforward"], train_num_points=c["num_points"], dropout=0.0,
        oversample_ratio=3.0, importance_sample_ratio=0.75, class_weight=2.0, mask_weight=5.0,
        dice_weight=5.0, no_object_weight=0.1, use_auxiliary_loss=True)
    return Mask2FormerForUniversalSegmentation(cfg)


def make_batch(batch: int, size: int, segments: int, seed: int = 0):
    """Normalised-looking images and `segments` random ellipses per image (later ones on top, so
    the masks do not overlap), each with a random class."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    targets = []
    for _ in range(batch):
        canvas = torch.full((size, size), -1, dtype=torch.int64)
        for k in range(segments):
            cy, cx = (torch.rand(2, generator=g) * size).tolist()
            ry, rx = ((0.08 + 0.25 * torch.rand(2, generator=g)) * size).tolist()
            canvas[((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1] = k
        present = [k for k in range(segments) if bool((canvas == k).any())]
        masks = torch.stack([canvas == k for k in present])
        labels = torch.randint(0, CLASSES, (len(present),), generator=g)
        targets.append({"labels": labels, "masks": masks})
    return images, targets


def step_fn(which: str, model: torch.nn.Module, images: torch.Tensor, targets: list[dict]):
    """One training step's closure: forward with the losses, backward, AdamW (the paper's
    optimiser, lr 1e-4, weight decay 0.05)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    model.train()
    mask_labels = [t["masks"].float() for t in targets]
    class_labels = [t["labels"] for t in targets]

    def step() -> float:
        if which == "ours":
            loss = sum(model(images, targets).values())
        else:
            loss = model(pixel_values=images, mask_labels=mask_labels, class_labels=class_labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def memory_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: print {"before", "peak"} MiB around `--steps` training steps."""
    torch.manual_seed(0)
    model = build(args.memory_child, args)
    images, targets = make_batch(args.batch, args.size, args.segments)
    step = step_fn(args.memory_child, model, images, targets)
    before, reset = _status_mib("VmRSS"), reset_peak_rss()
    for _ in range(args.steps):
        step()
    print(json.dumps({"before": before, "peak": _status_mib("VmHWM"), "reset": reset}))


def measure_memory(which: str, batch: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--memory-child", which, "--batch", str(batch),
               "--size", str(args.size), "--segments", str(args.segments), "--threads", str(args.threads),
               "--steps", "1" if args.dry_run else "2"]
    if args.dry_run:
        command.append("--dry-run")
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"memory subprocess {' '.join(command)} failed:\n{run.stderr[-3000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return {"delta": result["peak"] - result["before"], **result}


def profile(which: str, args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    model = build(which, args)
    step = step_fn(which, model, *make_batch(args.batch, args.size, args.segments))
    step()  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        step()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--segments", type=int, default=5, help="random segments per image")
    parser.add_argument("--iters", type=int, default=1, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--dry-run", action="store_true",
                        help="a tiny configuration (R18, hidden 64, 10 queries) at 64x64, one round of "
                             "one step, memory over 1 step: checks that it runs")
    parser.add_argument("--profile", choices=("ours", "theirs"), help="profile one step of one model instead")
    parser.add_argument("--memory-child", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry_run:
        args.size, args.iters, args.rounds = 64, 1, 1
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    if args.profile:
        profile(args.profile, args)
        return

    import transformers

    torch.manual_seed(0)
    images, targets = make_batch(args.batch, args.size, args.segments)
    models = {which: build(which, args) for which in ("ours", "theirs")}
    params = {w: sum(p.numel() for p in m.parameters()) / 1e6 for w, m in models.items()}
    steps = {w: step_fn(w, m, images, targets) for w, m in models.items()}
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    paired = []  # per round: ours / theirs, robust to a load that changes between rounds
    losses: dict[str, float] = {}
    for round_index in range(args.rounds):
        order = ("ours", "theirs") if round_index % 2 == 0 else ("theirs", "ours")
        for which in order:
            if not times[which]:
                losses[which] = steps[which]()  # warm-up: first allocations, kernel choices
            for _ in range(args.iters):
                start = time.perf_counter()
                losses[which] = steps[which]()
                times[which].append(time.perf_counter() - start)
            if not math.isfinite(losses[which]):
                raise SystemExit(f"{which}: loss {losses[which]} is not finite")
        paired.append(statistics.median(times["ours"][-args.iters:])
                      / statistics.median(times["theirs"][-args.iters:]))
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["theirs"])
    c = config(args)
    backbone = "R18 (dry run)" if args.dry_run else "R50"
    print(f"Mask2Former {backbone} training step, batch {args.batch}, {args.size}x{args.size}, "
          f"{args.segments} segments per image, CPU, {args.threads} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {c['num_queries']} queries, hidden {c['hidden_dim']}, "
          f"dec_layers {c['dec_layers']}, enc_layers {c['enc_layers']}, {c['num_points']} points; median "
          f"of {len(times['ours'])} steps each ({args.rounds} alternating rounds of {args.iters}, warm-up "
          "dropped)\n")
    print("| model | params (M) | s/step | steps (s) | last loss |")
    print("|---|---|---|---|---|")
    for which, label in (("ours", "segtrain"), ("theirs", "transformers")):
        print(f"| {label} | {params[which]:.2f} | {statistics.median(times[which]):.2f} | "
              f"{', '.join(f'{t:.2f}' for t in times[which])} | {losses[which]:.2f} |")
    print(f"\nratio segtrain / transformers: {ours / theirs:.3f} of the medians, "
          f"{statistics.median(paired):.3f} median of the rounds' ({', '.join(f'{r:.2f}' for r in paired)}), "
          f"{min(times['ours']) / min(times['theirs']):.3f} of the fastest steps; target <= 1.0")
    if args.no_memory:
        return
    del models, steps
    print(f"\npeak RSS over {1 if args.dry_run else 2} training steps minus RSS before them, fresh process "
          "each (MiB):\n")
    print("| model | batch 1 | batch 2 | per image (batch 2 / 2) | per image (batch 2 - batch 1) |")
    print("|---|---|---|---|---|")
    for which, label in (("ours", "segtrain"), ("theirs", "transformers")):
        one, two = measure_memory(which, 1, args), measure_memory(which, 2, args)
        print(f"| {label} | {one['delta']:.0f} | {two['delta']:.0f} | {two['delta'] / 2:.0f} | "
              f"{two['delta'] - one['delta']:.0f} |")


if __name__ == "__main__":
    main()
