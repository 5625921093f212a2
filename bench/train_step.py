"""A real-scale training step of the new semantic models, and their size next to the papers'.

For DeepLabV3+ R50-D8 (19 classes), UPerNet Swin-T and SegFormer-B0 (150 classes): seconds per
training step (forward, loss, backward, SGD step) at batch 2 and 512x512, median of --steps after
one warm-up, as a ratio against torchvision's DeepLabV3 R50 (the existing model family) timed in
the same run; parameters; and multiply-adds (what the papers call FLOPs) counted by torch's
FlopCounterMode at the paper's input size, next to the published figure.

    python bench/train_step.py                 # CPU, 3 steps each
    python bench/train_step.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as nnf

from segtrain.model_info import count_flops, count_parameters
from segtrain.models.encoder_decoder import build_deeplabv3plus, build_segformer, build_upernet
from segtrain.models.torchvision_seg import build_torchvision_segmentation

# label -> (builder, published params in millions, published GMACs, size the GMACs are at, source)
MODELS = {
    "DeepLabV3 R50-D8 (torchvision, baseline)": (
        lambda: build_torchvision_segmentation("deeplabv3_resnet50", 19, aux_loss=True), None, None,
        (512, 1024), ""),
    "DeepLabV3+ R50-D8": (
        lambda: build_deeplabv3plus(19, "resnet50", output_stride=8), None, None, (512, 1024),
        "MMSeg's model zoo publishes no params/FLOPs for it (7.5 GB, 3.94 img/s on a V100)"),
    "UPerNet Swin-T": (
        lambda: build_upernet(150, "swin_t", output_stride=32), 60.0, 945.0, (512, 2048),
        "Swin paper (Liu et al. 2021) Table 3: 60M params, 945G FLOPs at 512x2048"),
    "SegFormer-B0": (
        lambda: build_segformer(150, "mit_b0"), 3.8, 8.4, (512, 512),
        "SegFormer paper (Xie et al. 2021) Table 2: 3.8M params, 8.4G FLOPs at 512x512"),
}


def step_seconds(model: torch.nn.Module, args: argparse.Namespace) -> float:
    device = torch.device(args.device)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(2, 3, args.size, args.size, device=device)
    target = torch.randint(0, 19, (2, args.size, args.size), device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    times = []
    for i in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
            loss = sum(nnf.cross_entropy(v.float(), target) for v in out.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step allocates and picks kernels
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-flops", action="store_true", help="skip the (slow on CPU) FLOP count")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, base = [], None
    for label, (build, paper_params, paper_gmacs, flops_size, source) in MODELS.items():
        model = build()
        params = count_parameters(model)[0] / 1e6
        gmacs = None
        if not args.no_flops:
            gmacs = count_flops(model, torch.randn(1, 3, *flops_size))["total"] / 2e9
        seconds = step_seconds(model, args)
        base = base or seconds
        rows.append((label, seconds, seconds / base, params, paper_params, gmacs, paper_gmacs, flops_size,
                     source))
        del model
    print(f"training step, batch 2, {args.size}x{args.size}, {args.device}, {args.precision}, median of "
          f"{args.steps}\n")
    print("| model | s/step | vs DeepLabV3 | params (M) | paper | GMACs | paper | at | source |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, s, ratio, p, pp, g, pg, size, source in rows:
        print(f"| {label} | {s:.2f} | {ratio:.2f}x | {p:.1f} | {pp or '-'} | "
              f"{'-' if g is None else f'{g:.1f}'} | {pg or '-'} | {size[0]}x{size[1]} | {source} |")


if __name__ == "__main__":
    main()
