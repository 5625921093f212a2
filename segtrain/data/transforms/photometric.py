"""MMSegmentation's PhotoMetricDistortion as a torchvision v2 transform on uint8 images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


class PhotoMetricDistortion(v2.Transform):
    """Random brightness, contrast, saturation and hue on uint8 images (3, H, W); targets untouched.

    MMSeg's order and odds: each step runs with probability `prob` (0.5); contrast comes either
    second or last, by a fair coin. The mapping onto torchvision:
      brightness: img + d, d ~ U(-brightness_delta, brightness_delta) (MMSeg's additive delta;
        v2.ColorJitter's brightness multiplies, so it is done by hand here);
      contrast: img * a, a ~ U(contrast_range) (MMSeg scales about 0, not about the grey mean
        as F.adjust_contrast does, so this too is by hand);
      saturation: F.adjust_saturation(img, a), a ~ U(saturation_range) (a blend with greyscale;
        MMSeg scales HSV's S, which moves colours the same way but not by identical amounts);
      hue: F.adjust_hue(img, h / 180), integer h ~ [-hue_delta, hue_delta) (OpenCV's uint8 hue
        spans 180 units, so MMSeg's delta 18 is a tenth of the colour circle).
    Brightness and contrast clip to [0, 255] and truncate to uint8, as MMSeg's `convert` does.
    """

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
        prob: float = 0.5,
    ) -> None:
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob={prob}: expected a probability in [0, 1]")
        if not 0 <= hue_delta <= 90 or brightness_delta < 0:
            raise ValueError(
                f"brightness_delta={brightness_delta}, hue_delta={hue_delta}: expected brightness_delta >= 0 "
                "and hue_delta in [0, 90] (OpenCV hue units, 180 per turn)"
            )
        self.brightness_delta, self.hue_delta = float(brightness_delta), int(hue_delta)
        self.prob = float(prob)
        self.contrast_range = tuple(float(v) for v in contrast_range)
        self.saturation_range = tuple(float(v) for v in saturation_range)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        def coin() -> bool:
            return bool(torch.rand(()) < self.prob)

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand(()))

        delta, hue = self.brightness_delta, self.hue_delta
        return {
            "brightness": uniform(-delta, delta) if coin() else None,
            "contrast_first": bool(torch.randint(2, ())),
            "contrast": uniform(*self.contrast_range) if coin() else None,
            "saturation": uniform(*self.saturation_range) if coin() else None,
            "hue": int(torch.randint(-hue, hue, ())) if hue and coin() else None,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # Only images: masks and boxes reach here too, and must pass through unchanged.
        if not (isinstance(inpt, tv_tensors.Image) or type(inpt) is torch.Tensor):
            return inpt
        if inpt.dtype != torch.uint8:
            raise TypeError(
                f"PhotoMetricDistortion expects uint8 images (0..255) but got {inpt.dtype}; put it before "
                "any ToDtype/normalisation (the tasks normalise on the device)"
            )
        image = inpt.as_subclass(torch.Tensor)
        if params["brightness"] is not None:
            image = _affine(image, 1.0, params["brightness"])
        if params["contrast_first"] and params["contrast"] is not None:
            image = _affine(image, params["contrast"], 0.0)
        if params["saturation"] is not None:
            image = F.adjust_saturation(image, params["saturation"])
        if params["hue"] is not None:
            image = F.adjust_hue(image, params["hue"] / 180)
        if not params["contrast_first"] and params["contrast"] is not None:
            image = _affine(image, params["contrast"], 0.0)
        return tv_tensors.wrap(image, like=inpt) if isinstance(inpt, tv_tensors.Image) else image


def _affine(image: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """uint8 -> uint8: alpha * image + beta, clipped to [0, 255] and truncated (numpy's astype).

    A pointwise function of a uint8 value: computed on the 256 values once and looked up, equal
    to the float expression on every pixel and ~2x faster on a 512x1024 crop (measured).
    """
    table = (torch.arange(256, dtype=torch.float32) * alpha + beta).clamp_(0, 255).to(torch.uint8)
    # numpy's take indexes by the uint8 values as they are; torch would need int64 indices.
    return torch.from_numpy(table.numpy().take(image.numpy(force=True)))
