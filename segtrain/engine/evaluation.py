"""One evaluation pass: predict every batch of a loader and feed the task's evaluator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segtrain.data.loader import shutdown_workers
from segtrain.metrics.build import Evaluators
from segtrain.utils.tensors import to_cpu

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, precision: str):
    """`torch.autocast` for bf16/fp16, a no-op for fp32."""
    if precision == "fp32":
        return nullcontext()
    if precision not in DTYPES:
        raise ValueError(f"trainer.precision={precision!r}; expected one of fp32, bf16, fp16")
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    task: Any,
    loader: DataLoader,
    evaluator: Evaluators,
    device: torch.device,
    precision: str = "fp32",
    keep_first: int = 0,
    progress: bool | None = None,
    consumers: Sequence[Callable[[dict, list], None]] = (),
) -> tuple[dict, list[tuple[dict, Any]]]:
    """Run `model` over `loader`; returns (metrics, the first `keep_first` (batch, predictions)).

    `task.predict` gives per-image predictions in the format of segtrain.predictions; the
    evaluator reads them with the batch's per-image `targets`; `consumers` (e.g. a prediction
    writer) get `(batch, predictions)` too. The kept pairs feed TensorBoard's image panel; they
    live on the CPU.
    """
    was_training = model.training
    model.eval()
    evaluator.reset()
    kept: list[tuple[dict, Any]] = []
    batches = iter(loader)
    try:
        disable = None if progress is None else not progress  # None: hide when not a TTY
        for batch in tqdm(batches, total=len(loader), desc="eval", leave=False, disable=disable):
            batch = task.to_device(batch, device)
            with autocast_context(device, precision):
                predictions = task.predict(model, batch)
            evaluator.process(batch["targets"], predictions)
            for consume in consumers:
                consume(batch, predictions)
            if len(kept) < keep_first:
                kept.append((task.to_device(batch, torch.device("cpu")), to_cpu(predictions)))
        return evaluator.compute(), kept
    except BaseException:
        shutdown_workers(loader, batches)  # the traceback keeps `batches`, and its workers, alive
        raise
    finally:
        model.train(was_training)
