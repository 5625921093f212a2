"""Decoding images, label maps and COCO masks from files."""
