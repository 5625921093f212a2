"""Writing a dataset to disk in the standard formats (label PNGs, COCO JSON, COCO panoptic)."""
