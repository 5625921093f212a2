"""SemanticTask: batching, label checks, normalisation, losses, sliding-window inference, visuals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segtrain.tasks.semantic import SemanticTask


def _sample(h: int, w: int, value: int = 1, image_id: int = 0):
    image = torch.full((3, h, w), 7, dtype=torch.uint8)
    target = {"semantic": torch.full((h, w), value, dtype=torch.int64), "image_id": image_id,
              "orig_size": torch.tensor([h, w])}
    return image, target


class PixelNet(nn.Module):
    """A 1x1 convolution: every pixel's logits depend on that pixel alone."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


def test_collate_pads_images_with_zero_and_masks_with_ignore():
    task = SemanticTask(num_classes=3)
    batch = task.collate([_sample(4, 6), _sample(5, 3, value=2, image_id=9)])
    assert batch["images"].shape == (2, 3, 5, 6) and batch["images"].dtype == torch.uint8
    assert batch["semantic"][0, 4].eq(255).all() and batch["semantic"][1, :, 3:].eq(255).all()
    assert batch["semantic"][1, :5, :3].eq(2).all() and batch["images"][0, :, 4].eq(0).all()
    assert batch["image_ids"] == [0, 9]
    assert batch["orig_sizes"].tolist() == [[4, 6], [5, 3]]


def test_label_outside_the_class_range_names_the_image_and_values():
    task = SemanticTask(num_classes=3)
    with pytest.raises(ValueError, match=r"image_id 5: label values \[3, 7\].*\[0, 3\)"):
        image, target = _sample(4, 4, image_id=5)
        target["semantic"][0, 0], target["semantic"][1, 1] = 7, 3
        task.collate([(image, target)])


def test_normalize_uses_the_configured_statistics():
    task = SemanticTask(num_classes=3, mean=(10, 20, 30), std=(2, 4, 5))
    out = task.normalize(torch.full((1, 3, 2, 2), 40, dtype=torch.uint8))
    assert out.dtype == torch.float32
    assert out[0, :, 0, 0].tolist() == [15.0, 5.0, 2.0]


def test_training_step_adds_the_weighted_aux_loss():
    class TwoHeads(PixelNet):
        def forward(self, x):
            return {"out": self.conv(x), "aux": self.conv(x) * 0}

    task = SemanticTask(num_classes=3, loss=nn.CrossEntropyLoss(ignore_index=255), aux_weight=0.5)
    batch = task.collate([_sample(4, 4)])
    losses = task.training_step(TwoHeads(), batch)
    # aux logits are all zero: cross-entropy log(3), weighted by 0.5.
    assert losses["loss_aux"].item() == pytest.approx(0.5 * torch.log(torch.tensor(3.0)).item())
    assert losses["loss"].item() == pytest.approx((losses["loss_seg"] + losses["loss_aux"]).item())


def test_sliding_window_equals_whole_image_for_a_per_pixel_model():
    whole = SemanticTask(num_classes=3)
    slide = SemanticTask(num_classes=3, inference={"mode": "slide", "crop_size": [5, 4],
                                                   "stride": [3, 3]})
    torch.manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 11, 9), dtype=torch.uint8)
    batch = slide.collate([(image, {"image_id": i, "orig_size": torch.tensor([11, 9])})
                           for i, image in enumerate(images)])
    model = PixelNet()
    with torch.no_grad():
        expected = whole.logits(model, whole.normalize(batch["images"]))
        got = slide.logits(model, slide.normalize(batch["images"]))
    torch.testing.assert_close(got, expected)
    predictions = slide.predict(model, batch)
    assert [sorted(p) for p in predictions] == [["sem_seg"], ["sem_seg"]]
    assert torch.equal(torch.stack([p["sem_seg"] for p in predictions]), expected.argmax(1))


def test_predictions_are_cut_to_each_image_and_resized_to_its_original_size():
    task = SemanticTask(num_classes=3)
    small = (torch.zeros(3, 4, 6, dtype=torch.uint8), {"image_id": 0, "orig_size": torch.tensor([4, 6])})
    # a loader that halved this image: its prediction must come back at the original 10x8
    large = (torch.zeros(3, 5, 4, dtype=torch.uint8), {"image_id": 1, "orig_size": torch.tensor([10, 8])})
    batch = task.collate([small, large])
    assert batch["images"].shape == (2, 3, 5, 6)
    with torch.no_grad():
        predictions = task.predict(PixelNet(), batch)
    assert [tuple(p["sem_seg"].shape) for p in predictions] == [(4, 6), (10, 8)]
    assert [sorted(t) for t in batch["targets"]] == [["image_id", "orig_size"]] * 2  # no labels given


def test_slide_mode_without_a_crop_size_is_rejected():
    with pytest.raises(ValueError, match="crop_size"):
        SemanticTask(num_classes=3, inference={"mode": "slide"})


def test_visualize_lays_out_image_prediction_and_truth_side_by_side():
    task = SemanticTask(num_classes=3, palette=[(0, 0, 0), (255, 0, 0), (0, 255, 0)])
    batch = task.collate([_sample(4, 5), _sample(4, 5)])
    grid = task.visualize(batch, [{"sem_seg": torch.zeros(4, 5, dtype=torch.int64)}] * 2, max_images=1)
    assert grid.shape == (3, 4, 15) and grid.dtype == torch.uint8
    assert grid[:, 0, 0].tolist() == [7, 7, 7]            # the image
    assert grid[:, 0, 5].tolist() == [4, 4, 4]            # prediction: class 0, black at 50 %
    assert grid[:, 0, 10].tolist() == [131, 4, 4]         # truth: class 1, red at 50 %
