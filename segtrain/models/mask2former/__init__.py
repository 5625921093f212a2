"""Mask2Former (Cheng et al., CVPR 2022), written in plain PyTorch: no compiled op.

So far: the multi-scale deformable attention of its pixel decoder (`ms_deform_attn`) and the
Hungarian matcher of its set-prediction loss (`matcher`). The model itself is issue 16's next step.
"""
