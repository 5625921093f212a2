"""What a run shows while it trains: progress bar, log lines and TensorBoard scalars and images."""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from segtrain.metrics.report import flatten_metrics

log = logging.getLogger("segtrain.train")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run so far: CUDA allocator peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class Monitor:
    """Progress bar + periodic log line + TensorBoard writer; all silent on non-main ranks."""

    def __init__(
        self, run_dir: Path, total_iters: int, start_iter: int, device: torch.device, enabled: bool
    ) -> None:
        self.total, self.device, self.enabled = total_iters, device, enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))
        # disable=None: tqdm hides itself when stderr is not a terminal (logs, CI).
        self.bar = tqdm(
            total=total_iters, initial=start_iter, desc="train", dynamic_ncols=True,
            disable=None if enabled else True,
        )
        self._window_start = time.perf_counter()
        self._window_images = 0
        self._run_start = time.perf_counter()
        self._start_iter = start_iter

    def count_images(self, n: int) -> None:
        self._window_images += n

    def step(self) -> None:
        self.bar.update(1)

    def log_train(self, step: int, losses: dict[str, float], lr: float) -> None:
        """Write the window's mean losses, lr, throughput and memory; restart the window."""
        now = time.perf_counter()
        images_per_s = self._window_images / max(now - self._window_start, 1e-9)
        self._window_start, self._window_images = now, 0
        memory = peak_memory_mb(self.device)
        if not self.enabled:
            return
        done = step - self._start_iter
        eta = (now - self._run_start) / max(done, 1) * (self.total - step)
        self.bar.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
        parts = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
        message = (
            f"iter {step}/{self.total} {parts} lr {lr:.3e} {images_per_s:.1f} img/s "
            f"mem {memory:.0f} MiB eta {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        )
        if self.bar.disable:
            log.info(message)
        else:
            log.debug(message)
        for name, value in losses.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/images_per_s", images_per_s, step)
        self.writer.add_scalar("train/memory_mb", memory, step)

    def log_metrics(self, step: int, metrics: dict, images: torch.Tensor | None = None,
                    figures: dict[str, torch.Tensor] | None = None) -> None:
        """Scalars under val/<family>/<name>; `images` (prediction vs truth grid) and `figures`
        (the evaluators' pictures, e.g. val/confusion_matrix) as TensorBoard images."""
        if not self.enabled:
            return
        flat = flatten_metrics(metrics)
        headline = ", ".join(f"{k} {v:.2f}" for k, v in flat.items() if not math.isnan(v))
        if self.bar.disable:
            log.info(f"eval @ iter {step}: {headline}")
        else:
            tqdm.write(f"[eval @ iter {step}] {headline}", file=sys.stderr)
        for name, value in flat.items():
            self.writer.add_scalar(f"val/{name}", value, step)
        if images is not None:
            self.writer.add_image("val/prediction_vs_truth", images, step)
        for name, picture in (figures or {}).items():
            self.writer.add_image(f"val/{name}", picture, step)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
