"""Mask2Former (Cheng et al., CVPR 2022), written in plain PyTorch: no compiled op.

So far: the multi-scale deformable attention of its pixel decoder (`ms_deform_attn`), the
Hungarian matcher (`matcher`) and the set-prediction loss (`criterion`). The model itself is
issue 16's next step.
"""
