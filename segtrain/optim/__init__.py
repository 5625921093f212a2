"""Optimizer parameter groups and learning-rate schedules."""

from segtrain.optim.param_groups import build_param_groups
from segtrain.optim.schedulers import cosine, multistep, poly

__all__ = ["build_param_groups", "cosine", "multistep", "poly"]
