"""Model export (`segtrain export`) and running exported files (`segtrain predict ckpt=X.onnx`)."""
