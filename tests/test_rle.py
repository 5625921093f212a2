"""RLE encoding inside boxes against pycocotools' `encode` (byte-identical counts), and tight boxes."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from torch import nn

from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.metrics.coco import encode_masks, predictions_to_results
from segtrain.metrics.rle import encode_in_boxes, tight_boxes
from segtrain.tasks.instance import InstanceTask


def _reference(masks: np.ndarray) -> list[dict]:
    """pycocotools' encode of (N, H, W) masks, counts as str."""
    masks = masks.view(np.uint8) if masks.dtype == np.bool_ else masks
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    return [{"size": rle["size"], "counts": rle["counts"].decode("ascii")} for rle in rles]


def _compressed(counts: list[int], height: int, width: int) -> str:
    """The counts string of an uncompressed RLE (run lengths, column-major, zeros first)."""
    rle = mask_util.frPyObjects([{"size": [height, width], "counts": counts}], height, width)[0]
    return rle["counts"].decode("ascii")


def assert_encodes_as_pycocotools(masks: np.ndarray, boxes: np.ndarray) -> None:
    got = encode_in_boxes(masks, boxes)
    assert got == _reference(masks)
    assert all(isinstance(rle["counts"], str) for rle in got)


def _random_case(rng: np.random.Generator, height: int, width: int, num: int,
                 values: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """uint8 masks with random content (values 0..values-1) inside random boxes, which are returned
    grown by random margins, some reaching past the image (the encoder clamps them)."""
    masks = np.zeros((num, height, width), np.uint8)
    boxes = np.zeros((num, 4), np.int64)
    for i in range(num):
        kind = rng.integers(5)
        x0, x1 = np.sort(rng.integers(0, width + 1, 2))
        y0, y1 = np.sort(rng.integers(0, height + 1, 2))
        if kind == 0:  # full height: a column's last run continues at the next column's top
            y0, y1 = 0, height
        elif kind == 1:  # the whole image
            x0, y0, x1, y1 = 0, 0, width, height
        density = rng.choice([0.1, 0.5, 0.9, 1.0])
        patch = (rng.random((y1 - y0, x1 - x0)) < density) * rng.integers(1, values, (y1 - y0, x1 - x0))
        masks[i, y0:y1, x0:x1] = patch
        grow = rng.integers(0, 3, 4) * (rng.random() < 0.5)
        boxes[i] = [x0 - grow[0], y0 - grow[1], x1 + grow[2], y1 + grow[3]]
    return masks, boxes


@pytest.mark.parametrize("dtype", [np.uint8, np.bool_])
def test_random_masks_in_random_boxes_encode_as_pycocotools(dtype):
    rng = np.random.default_rng(0)
    for _ in range(400):
        height, width = rng.integers(1, 16, 2)
        masks, boxes = _random_case(rng, height, width, rng.integers(1, 7))
        assert_encodes_as_pycocotools(masks.astype(dtype), boxes)


def test_ellipses_at_full_resolution_encode_as_pycocotools():
    rng = np.random.default_rng(1)
    yy, xx = np.ogrid[:480, :640]
    params = np.stack([rng.uniform(-50, 690, 24), rng.uniform(-50, 530, 24),
                       rng.uniform(8, 240, 24), rng.uniform(8, 300, 24)], 1)
    masks = np.stack([((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1 for cx, cy, rx, ry in params])
    assert_encodes_as_pycocotools(masks, tight_boxes(torch.from_numpy(masks)).numpy())


def test_masks_touching_each_border_encode_as_pycocotools():
    height, width = 7, 5
    masks = np.zeros((6, height, width), np.bool_)
    masks[0, 0, 1:4] = True  # top row
    masks[1, -1, 1:4] = True  # bottom row
    masks[2, 2:5, 0] = True  # left column
    masks[3, 2:5, -1] = True  # right column
    masks[4, [0, -1], :] = True  # top and bottom rows: runs wrap from one column's bottom to the next
    masks[5, :, [0, -1]] = True  # first and last columns in full: the mask starts and ends with ones
    tight = tight_boxes(torch.from_numpy(masks)).numpy()
    assert_encodes_as_pycocotools(masks, tight)
    assert_encodes_as_pycocotools(masks, np.tile([[0, 0, width, height]], (6, 1)))


def test_full_height_boxes_merge_the_runs_of_adjacent_columns():
    masks = np.zeros((3, 4, 3), np.uint8)
    masks[0] = 1  # whole image: one run of ones after an empty zeros run
    masks[1, :, 1:] = 1
    masks[2, 2:, 0], masks[2, :2, 1] = 1, 1  # column 0's bottom run continues at column 1's top
    boxes = np.array([[0, 0, 3, 4], [1, 0, 3, 4], [0, 0, 2, 4]])
    expected = [[0, 12], [4, 8], [2, 4, 6]]
    got = encode_in_boxes(masks, boxes)
    assert [rle["counts"] for rle in got] == [_compressed(counts, 4, 3) for counts in expected]
    assert_encodes_as_pycocotools(masks, boxes)


def test_empty_masks_encode_as_pycocotools_with_empty_or_nonempty_boxes():
    masks = np.zeros((4, 6, 5), np.bool_)
    boxes = np.array([[0, 0, 0, 0], [2, 3, 2, 3], [1, 1, 4, 5], [0, 0, 5, 6]])
    assert_encodes_as_pycocotools(masks, boxes)
    assert [rle["counts"] for rle in encode_in_boxes(masks, boxes)] == [_compressed([30], 6, 5)] * 4


def test_single_pixels_in_the_corners_encode_as_pycocotools():
    masks = np.zeros((4, 5, 6), np.uint8)
    for i, (y, x) in enumerate([(0, 0), (0, 5), (4, 0), (4, 5)]):
        masks[i, y, x] = 1
    assert_encodes_as_pycocotools(masks, tight_boxes(torch.from_numpy(masks.astype(bool))).numpy())
    # The first pixel set: pycocotools' counts start with an empty zeros run.
    assert encode_in_boxes(masks[:1], np.array([[0, 0, 1, 1]])) == \
        [{"size": [5, 6], "counts": _compressed([0, 1, 29], 5, 6)}]


@pytest.mark.parametrize("size", [(1, 9), (9, 1), (1, 1)])
def test_single_row_and_single_column_images_encode_as_pycocotools(size):
    rng = np.random.default_rng(2)
    for _ in range(50):
        masks, boxes = _random_case(rng, *size, num=4)
        assert_encodes_as_pycocotools(masks, boxes)


def test_values_above_one_split_runs_as_pycocotools_does():
    # pycocotools starts a run wherever the byte changes, 1 -> 2 included; exactness covers that too.
    rng = np.random.default_rng(3)
    for _ in range(200):
        height, width = rng.integers(1, 8, 2)
        masks, boxes = _random_case(rng, height, width, 4, values=4)
        assert_encodes_as_pycocotools(masks, boxes)


def test_no_masks_give_no_rles():
    assert encode_in_boxes(np.zeros((0, 4, 5), np.bool_), np.zeros((0, 4), np.int64)) == []
    assert encode_masks(torch.zeros(0, 4, 5, dtype=torch.bool), torch.zeros(0, 4, dtype=torch.int64)) == []


def test_boxes_that_are_not_integer_n_by_4_are_refused():
    masks = np.zeros((2, 4, 5), np.bool_)
    with pytest.raises(ValueError, match="expected integer"):
        encode_in_boxes(masks, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        encode_in_boxes(masks, np.zeros((1, 4), np.int64))


def test_tight_boxes_are_the_extent_of_the_nonzero_pixels():
    rng = np.random.default_rng(4)
    masks, _ = _random_case(rng, 13, 17, 40)
    masks[0] = 0
    masks[1, 12, 16] = 1
    masks = torch.from_numpy(masks.astype(bool))
    expected = []
    for mask in masks:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        expected.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
                        if len(xs) else [0, 0, 0, 0])
    boxes = tight_boxes(masks)
    assert boxes.dtype == torch.int64 and boxes.tolist() == expected
    assert tight_boxes(torch.zeros(0, 3, 4, dtype=torch.bool)).shape == (0, 4)


class _Blobs(nn.Module):
    """Eval-mode stand-in: random blob mask probabilities, one of them empty after thresholding."""

    def forward(self, images):
        generator = torch.Generator().manual_seed(5)
        outputs = []
        for image in images:
            h, w = image.shape[-2:]
            probs = torch.rand(6, 1, h, w, generator=generator)
            probs[:, :, :, : w // 3] = 0  # zero outside a box, as Mask R-CNN's pasted masks are
            probs[0] = 0.2
            outputs.append({"boxes": torch.rand(6, 4, generator=generator) * 20,
                            "labels": torch.arange(1, 7) % 3 + 1, "scores": torch.linspace(0.9, 0.4, 6),
                            "masks": probs})
        return outputs


def test_results_with_the_tasks_mask_boxes_equal_results_without_them():
    task = InstanceTask(num_classes=4)
    image = torch.zeros(3, 24, 30, dtype=torch.uint8)
    batch = {"images": [image, image[:, :12, :15]],
             "targets": [{"orig_size": torch.tensor([24, 30])}, {"orig_size": torch.tensor([24, 30])}]}
    predictions = [p["instances"] for p in task.predict(_Blobs(), batch)]
    meta = DatasetMeta(["background", "a", "b", "c"], default_palette(4), thing_ids=[1, 2, 3], stuff_ids=[0])
    for prediction in predictions:
        assert torch.equal(prediction["mask_boxes"], tight_boxes(prediction["masks"]))
        assert prediction["mask_boxes"][1:, 0].min() >= 10  # boxes, not the whole image
        plain = {key: value for key, value in prediction.items() if key != "mask_boxes"}
        assert predictions_to_results(7, prediction, meta) == predictions_to_results(7, plain, meta)
        # The boxes are used: masks outside them (here: every pixel) are not encoded.
        wrong = dict(prediction, mask_boxes=torch.zeros_like(prediction["mask_boxes"]))
        assert predictions_to_results(7, wrong, meta) != predictions_to_results(7, plain, meta)
