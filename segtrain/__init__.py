"""segtrain: config-driven training and evaluation of segmentation models."""

__version__ = "0.1.0"
