"""A weighted sum of losses whose terms can be logged one by one."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class CombinedLoss(nn.Module):
    """`sum(weights[name] * term(logits, target))` over named loss terms (weights default 1).

    After each call `last_parts` holds every term's unweighted value, detached, for logging.
    """

    def __init__(
        self, terms: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None
    ) -> None:
        super().__init__()
        if not terms:
            raise ValueError("CombinedLoss: terms is empty; give at least one named loss")
        self.terms = nn.ModuleDict({str(name): term for name, term in terms.items()})
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.terms))
        if unknown:
            raise KeyError(
                f"CombinedLoss: weights name {unknown}, which are not terms; terms are "
                f"{sorted(self.terms)}"
            )
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.terms}
        self.last_parts: dict[str, torch.Tensor] = {}

    def parts(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term's unweighted value (scalars, with grad) for logits (N, C, H, W)."""
        return {name: term(logits, target) for name, term in self.terms.items()}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits float (N, C, H, W), target int64 (N, H, W) -> the weighted total, a scalar."""
        parts = self.parts(logits, target)
        self.last_parts = {name: value.detach() for name, value in parts.items()}
        return sum((self.weights[name] * value for name, value in parts.items()),
                   start=torch.zeros((), device=logits.device))
