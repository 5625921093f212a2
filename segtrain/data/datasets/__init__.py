"""Datasets: the official on-disk layouts, folders of images and masks, and the synthetic shapes."""
