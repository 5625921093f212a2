"""Checkpoints written before a module moved still load: their stored `_target_`s are renamed.

A checkpoint's config names callables by their import path at the time it was written
(`segtrain.data.datasets.synthetic.SyntheticSegmentation`). When a module moves, its old path goes into
`MOVED_MODULES`, and `upgrade_targets` rewrites such names in a stored config before the trust
check (segtrain.config_trust), which then sees only current, shipped names.
"""

from __future__ import annotations

from typing import Any

# old module -> new module (issue 14: segtrain/data/ grouped by role)
MOVED_MODULES = {
    "segtrain.data.ade20k": "segtrain.data.datasets.ade20k",
    "segtrain.data.cityscapes": "segtrain.data.datasets.cityscapes",
    "segtrain.data.coco": "segtrain.data.datasets.coco",
    "segtrain.data.folder": "segtrain.data.datasets.folder",
    "segtrain.data.label_scan": "segtrain.data.datasets.label_scan",
    "segtrain.data.layout": "segtrain.data.datasets.layout",
    "segtrain.data.panoptic": "segtrain.data.datasets.panoptic",
    "segtrain.data.synthetic": "segtrain.data.datasets.synthetic",
    "segtrain.data.synthetic_shapes": "segtrain.data.datasets.synthetic_shapes",
    "segtrain.data.voc": "segtrain.data.datasets.voc",
    "segtrain.data.voc_instance": "segtrain.data.datasets.voc_instance",
    "segtrain.data.transforms": "segtrain.data.transforms.presets",
    "segtrain.data.photometric": "segtrain.data.transforms.photometric",
    "segtrain.data.window_resize": "segtrain.data.transforms.window_resize",
    "segtrain.data.image_io": "segtrain.data.codecs.image_io",
    "segtrain.data.coco_masks": "segtrain.data.codecs.coco_masks",
    "segtrain.data.export": "segtrain.data.export.semantic",
    "segtrain.data.coco_export": "segtrain.data.export.coco",
    "segtrain.data.panoptic_export": "segtrain.data.export.panoptic",
}

# old callable -> new callable taking the same keywords (issue 15: the U-Net config targets a
# builder that returns the same UNet when model.backbone is null)
RENAMED_TARGETS = {
    "segtrain.models.unet.UNet": "segtrain.models.unet.build_unet",
}


def upgrade_target(target: str) -> str:
    """`target` renamed when the callable itself was replaced, or when it lies in a moved module
    (exact module match)."""
    if target in RENAMED_TARGETS:
        return RENAMED_TARGETS[target]
    module, _, name = target.rpartition(".")
    return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else target


def upgrade_targets(node: Any) -> Any:
    """A copy of plain YAML data (dicts, lists, scalars) with every string `_target_` upgraded."""
    if isinstance(node, dict):
        return {key: upgrade_target(value) if key == "_target_" and isinstance(value, str)
                else upgrade_targets(value) for key, value in node.items()}
    if isinstance(node, list):
        return [upgrade_targets(value) for value in node]
    return node
