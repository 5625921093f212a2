"""Datasets: the official on-disk layouts, folders of images and masks (semantic, instance), the
synthetic shapes."""
