"""Joint image/target transforms (torchvision v2) and the presets built from YAML."""
