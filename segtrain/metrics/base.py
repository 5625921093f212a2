"""Evaluator base class: accumulate per batch, reduce across ranks once, then compute metrics."""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING, Any

from segtrain.utils.distributed import all_gather_objects, all_reduce_sum, is_distributed

if TYPE_CHECKING:  # torch is not imported at run time: `segtrain score` stays light
    import torch


class Evaluator:
    """`reset()`, `process(batch, predictions)`, `compute() -> dict`; subclasses never touch DDP.

    The pattern, so that the cross-rank reduction is written once, here:

    - In `reset()` a subclass declares its accumulators: `self._add_state(name, tensor)` for
      anything that *sums* across ranks (counts, confusion matrices), `self._add_list_state(name)`
      for per-sample records that are *concatenated* across ranks (e.g. COCO result dicts). Both
      become attributes (`self.<name>`) that `process()` updates in place or appends to.
    - `process()` only accumulates, locally.
    - `compute()` (this class; do not override) builds a fresh dict of the synchronised state —
      tensors summed over ranks with all-reduce, lists gathered and concatenated in rank order —
      and passes it to the subclass's `_compute(state) -> dict`. The local accumulators are left
      untouched, so `compute()` may be called again.

    Under DDP `compute()` is a collective: every rank must call it, and every rank gets the same
    metrics. Sum reduction is exact only if each sample is processed by exactly one rank, so the
    evaluation sampler must shard without padding duplicates.
    """

    def __init__(self) -> None:
        self._state_names: list[str] = []
        self._list_state_names: list[str] = []

    def _add_state(self, name: str, tensor: torch.Tensor) -> None:
        """Declare (or re-initialise) a tensor accumulator that is summed across ranks."""
        if name not in self._state_names:
            self._state_names.append(name)
        setattr(self, name, tensor)

    def _add_list_state(self, name: str) -> None:
        """Declare (or empty) a list accumulator whose items are concatenated across ranks."""
        if name not in self._list_state_names:
            self._list_state_names.append(name)
        setattr(self, name, [])

    def reset(self) -> None:
        """Start a new evaluation: re-create every accumulator."""
        raise NotImplementedError

    def process(self, batch: dict[str, Any], predictions: Any) -> None:
        """Accumulate one batch of the task's predictions against the batch's targets."""
        raise NotImplementedError

    def _compute(self, state: dict[str, Any]) -> dict:
        """Metrics from the synchronised state (same keys as the declared accumulators)."""
        raise NotImplementedError

    def synchronized_state(self) -> dict[str, Any]:
        """Declared accumulators reduced over all ranks (copies; local state is not modified)."""
        state: dict[str, Any] = {}
        distributed = is_distributed()
        for name in self._state_names:
            copy = getattr(self, name).clone()
            state[name] = all_reduce_sum(copy) if distributed else copy
        for name in self._list_state_names:
            local = getattr(self, name)
            if distributed:
                state[name] = list(chain.from_iterable(all_gather_objects(local)))
            else:
                state[name] = list(local)
        return state

    def compute(self) -> dict:
        """Metrics nested by family (e.g. `{"semantic": {...}}`), identical on every rank."""
        return self._compute(self.synchronized_state())
