"""PredictionWriter on hand-built predictions of the contract format: the files each family gets,
their values, that pycocotools and `segtrain score` read them, overlays, and no overwriting."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from pycocotools.coco import COCO

from segtrain.data.codecs.image_io import read_label
from segtrain.data.datasets.synthetic import SyntheticDataset
from segtrain.data.export.coco import write_coco_instances
from segtrain.data.export.panoptic import write_coco_panoptic
from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.inference.overlays import render_overlay
from segtrain.inference.writers import PredictionWriter
from segtrain.metrics.coco import score_coco
from segtrain.metrics.panoptic import score_panoptic
from segtrain.predictions import check_prediction

META = DatasetMeta(["background", "cat", "dog"], default_palette(3), thing_ids=[1, 2], stuff_ids=[0])
# A panoptic dataset: stuff first, things after, dataset ids with gaps.
META_PANOPTIC = DatasetMeta(["sky", "road", "car", "person"], default_palette(4), thing_ids=[2, 3],
                            stuff_ids=[0, 1], category_ids=[100, 101, 3, 1])


def _target(image_id: int, size=(12, 16), file_name: str | None = None) -> dict:
    target = {"image_id": image_id, "orig_size": torch.tensor(size)}
    if file_name is not None:
        target["file_name"] = file_name
    return target


def _image(size=(12, 16), value=100) -> torch.Tensor:
    return torch.full((3, *size), value, dtype=torch.uint8)


def _instances(size=(12, 16), scores=(0.9, 0.2), labels=(1, 2)) -> dict:
    n = len(scores)
    masks = torch.zeros(n, *size, dtype=torch.bool)
    boxes = torch.zeros(n, 4)
    for i in range(n):
        y0, x0 = 1 + 2 * i, 2 + 3 * i
        masks[i, y0:y0 + 4, x0:x0 + 5] = True
        boxes[i] = torch.tensor([x0, y0, x0 + 5, y0 + 4], dtype=torch.float32)
    return {"masks": masks, "boxes": boxes, "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.int64)}


# ------------------------------------------------------------------------------- semantic


def test_semantic_predictions_become_palette_pngs_of_class_ids_named_by_stem(tmp_path):
    labels = torch.randint(0, 3, (12, 16), generator=torch.Generator().manual_seed(0))
    scores = torch.nn.functional.one_hot(labels, 3).permute(2, 0, 1).float()  # (C, H, W) probabilities
    writer = PredictionWriter(tmp_path, META, overlay=False)
    writer.write(None, [_target(0, file_name="a.jpg"), _target(7)],
                 [{"sem_seg": labels}, {"sem_seg": scores}])
    writer.close()
    for name in ("a.png", "000000000007.png"):
        png = tmp_path / "semantic" / name
        assert torch.equal(read_label(png), labels)
        assert Image.open(png).mode == "P"
        assert Image.open(png).getpalette()[:9] == [c for colour in META.palette for c in colour]
    assert not (tmp_path / "instances.json").exists() and not (tmp_path / "panoptic.json").exists()
    assert (tmp_path / "skipped.txt").read_text() == ""


@pytest.mark.parametrize("threads", [0, 1])
def test_a_prediction_of_another_size_than_the_image_is_an_error(tmp_path, threads):
    writer = PredictionWriter(tmp_path, META, overlay=False, threads=threads)
    with pytest.raises(ValueError, match=r"image a: the sem_seg prediction is \(12, 15\) but the image "
                                         r"is \(12, 16\)"):
        writer.write(None, [_target(0, file_name="a")], [{"sem_seg": torch.zeros(12, 15, dtype=torch.int64)}])
        writer.close()  # a write thread's error is raised by a later call
    assert not (tmp_path / "skipped.txt").exists()


# ------------------------------------------------------------------------------ instances


def test_instances_json_keeps_every_detection_with_dataset_ids_and_loads_in_pycocotools(tmp_path):
    instances = _instances(scores=(0.9, 0.2), labels=(1, 2))
    check_prediction({"instances": instances}, (12, 16))
    writer = PredictionWriter(tmp_path, META_PANOPTIC, overlay=False, score_thresh=0.5)
    writer.write(None, [_target(0, file_name="x.jpg"), _target(1, file_name="y.png")],
                 [{"instances": instances}, {"instances": _instances(scores=(), labels=())}])
    writer.close()
    data = json.loads((tmp_path / "instances.json").read_text())
    assert data["images"] == [{"id": 0, "file_name": "x.jpg", "height": 12, "width": 16},
                              {"id": 1, "file_name": "y.png", "height": 12, "width": 16}]
    assert data["categories"] == [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}]
    first, second = data["annotations"]  # the 0.2 detection is kept: AP needs it
    assert (first["category_id"], second["category_id"]) == (3, 1)  # label k -> thing_ids[k - 1]
    assert first["bbox"] == [2.0, 1.0, 5.0, 4.0] and first["area"] == 20.0 and first["file_name"] == "x.jpg"
    assert second["score"] == pytest.approx(0.2)

    coco = COCO(str(tmp_path / "instances.json"))  # a COCO dataset of the detections
    assert len(coco.getAnnIds()) == 2 and coco.annToMask(coco.anns[1]).sum() == 20
    gt = COCO(str(tmp_path / "instances.json"))
    results = gt.loadRes(data["annotations"])  # and detections for COCOeval
    assert len(results.anns) == 2


def test_instances_json_is_written_for_an_instance_model_that_detected_nothing(tmp_path):
    writer = PredictionWriter(tmp_path, META, overlay=False)
    writer.write(None, [_target(0, file_name="a")], [{"instances": _instances(scores=(), labels=())}])
    assert writer.close() == {"images": 1, "detections": 0, "skipped": 0}
    data = json.loads((tmp_path / "instances.json").read_text())
    assert data["annotations"] == [] and len(data["images"]) == 1


@pytest.fixture(scope="module")
def instance_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    dataset = SyntheticDataset(split="val", num_samples=4, image_size=40, num_classes=4, seed=1)
    return dataset, write_coco_instances(dataset, root)


def test_perfect_instances_score_100_ap_matched_to_the_ground_truth_by_file_name(tmp_path, instance_data):
    dataset, gt_json = instance_data
    writer = PredictionWriter(tmp_path, dataset.meta, overlay=False)
    for index in reversed(range(len(dataset))):  # another order, and ids that are not the GT's
        _, target = dataset[index]
        n = len(target["labels"])
        prediction = {"instances": {"masks": target["masks"].as_subclass(torch.Tensor),
                                    "boxes": target["boxes"].as_subclass(torch.Tensor).float(),
                                    "scores": torch.linspace(1.0, 0.5, n), "labels": target["labels"]}}
        writer.write(None, [_target(100 + index, (40, 40), f"{target['image_id']:012d}.png")], [prediction])
    writer.close()
    metrics = score_coco(gt_json, tmp_path / "instances.json")
    assert metrics["segm"]["AP"] == pytest.approx(100.0) and metrics["bbox"]["AP"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------- panoptic


def test_panoptic_png_and_json_in_coco_format_with_dataset_category_ids(tmp_path):
    ids = torch.zeros(12, 16, dtype=torch.int32)
    ids[:6] = 1
    ids[6:, :8] = 300
    segments = [{"id": 1, "category_id": 0, "isthing": False, "score": 1.0},
                {"id": 300, "category_id": 3, "isthing": True, "score": 0.8}]
    check_prediction({"panoptic": ids, "segments": segments}, (12, 16))
    writer = PredictionWriter(tmp_path, META_PANOPTIC, overlay=False)
    writer.write(None, [_target(5, file_name="street.jpg")], [{"panoptic": ids, "segments": segments}])
    writer.close()
    rgb = np.asarray(Image.open(tmp_path / "panoptic" / "street.png")).astype(np.int64)
    assert np.array_equal(rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2], ids.numpy())
    data = json.loads((tmp_path / "panoptic.json").read_text())
    assert data["annotations"] == [{"image_id": 5, "file_name": "street.png", "segments_info": [
        {"id": 1, "category_id": 100, "isthing": 0, "score": 1.0, "area": 96},
        {"id": 300, "category_id": 1, "isthing": 1, "score": 0.8, "area": 48}]}]
    assert data["images"] == [{"id": 5, "file_name": "street.jpg", "height": 12, "width": 16}]
    assert {c["id"]: c["isthing"] for c in data["categories"]} == {100: 0, 101: 0, 3: 1, 1: 1}


def test_perfect_panoptic_predictions_score_100_pq_matched_by_file_name(tmp_path):
    dataset = SyntheticDataset(split="val", num_samples=3, image_size=40, num_classes=8, seed=2,
                               stuff_classes=3, crowd_prob=0.0)
    gt_json = write_coco_panoptic(dataset, tmp_path / "gt")
    gt = json.loads(gt_json.read_text())
    out = tmp_path / "pred"
    writer = PredictionWriter(out, dataset.meta, overlay=False)
    for index, ann in enumerate(gt["annotations"]):
        _, target = dataset[index]
        segments = [{"id": int(i), "category_id": int(c), "isthing": int(c) in dataset.meta.thing_ids,
                     "score": 1.0} for i, c in zip(target["segments"]["ids"], target["segments"]["classes"])]
        writer.write(None, [_target(10 + index, (40, 40), ann["file_name"])],
                     [{"panoptic": target["panoptic"].as_subclass(torch.Tensor).int(), "segments": segments}])
    writer.close()
    metrics = score_panoptic(gt_json, gt_json.with_suffix(""), out / "panoptic.json", out / "panoptic")
    assert metrics["panoptic"]["PQ"] == pytest.approx(100.0)


# -------------------------------------------------------------------------------- overlays


def test_overlays_draw_instances_at_or_above_the_score_threshold_only(tmp_path):
    masks = torch.zeros(2, 96, 96, dtype=torch.bool)
    masks[0, 60:80, 10:30] = True  # scores 0.9: drawn
    masks[1, 60:80, 60:80] = True  # scores 0.2: not drawn
    instances = {"masks": masks, "boxes": torch.tensor([[10.0, 60, 30, 80], [60, 60, 80, 80]]),
                 "scores": torch.tensor([0.9, 0.2]), "labels": torch.tensor([1, 2])}
    image = _image((96, 96))
    picture = np.asarray(render_overlay(image, {"instances": instances}, META, score_thresh=0.5))
    pixels = image.permute(1, 2, 0).numpy()
    assert picture.shape == (96, 96, 3)
    assert (picture[masks[0].numpy()] != pixels[masks[0].numpy()]).any(axis=-1).all()
    assert (picture[55:, 55:] == pixels[55:, 55:]).all()  # the low-scoring one, with its box and label


@pytest.mark.parametrize("prediction", [
    {"sem_seg": torch.tensor([[0, 1], [2, 2]]).repeat_interleave(6, 0).repeat_interleave(8, 1)},
    {"panoptic": torch.ones(12, 16, dtype=torch.int32),
     "segments": [{"id": 1, "category_id": 2, "isthing": True, "score": 0.9}]},
    {"instances": _instances()},
], ids=["semantic", "panoptic", "instances"])
def test_each_family_gets_an_overlay_jpeg_at_the_original_size(tmp_path, prediction):
    writer = PredictionWriter(tmp_path, META_PANOPTIC if "panoptic" in prediction else META)
    writer.write([_image((6, 8))], [_target(0, file_name="p.png")], [prediction])  # a resized image
    writer.close()
    with Image.open(tmp_path / "overlays" / "p.jpg") as overlay:
        assert overlay.format == "JPEG" and overlay.size == (16, 12)


# ------------------------------------------------------------------------------- overwrite


def test_an_output_holding_predictions_is_refused_and_left_intact_unless_overwrite(tmp_path):
    first = PredictionWriter(tmp_path, META, overlay=False)
    first.write(None, [_target(0, file_name="a")], [{"sem_seg": torch.zeros(12, 16, dtype=torch.int64)}])
    first.close()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=r"already holds predictions \(2 files, e.g. .*semantic/a.png\)"
                                              r".*overwrite=true"):
        PredictionWriter(tmp_path, META)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    again = PredictionWriter(tmp_path, META, overlay=False, overwrite=True)
    again.write(None, [_target(0, file_name="a")], [{"sem_seg": torch.ones(12, 16, dtype=torch.int64)}])
    again.close()
    assert int(read_label(tmp_path / "semantic" / "a.png").max()) == 1


def test_other_files_in_the_output_do_not_count_as_predictions(tmp_path):
    (tmp_path / "notes.md").write_text("mine")
    PredictionWriter(tmp_path, META)  # no error
    assert (tmp_path / "notes.md").read_text() == "mine"


def test_skipped_files_are_listed(tmp_path):
    writer = PredictionWriter(tmp_path, META)
    assert writer.close(["x.png\tcannot decode"])["skipped"] == 1
    assert (tmp_path / "skipped.txt").read_text() == "x.png\tcannot decode\n"


# ---------------------------------------------------------------------------- distributed


def _write_share(rank: int, world: int, tmp: str) -> None:
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
    out = f"{tmp}/out{world}"
    writer = PredictionWriter(out, META, overlay=True)
    images = list(range(5))
    share = images[rank * 5 // world:(rank + 1) * 5 // world]
    for i in share:
        instances = _instances(scores=(0.9 - i / 10, 0.3), labels=(1 + i % 2, 2))
        writer.write([_image()], [_target(i, file_name=f"im{i}.png")],
                     [{"instances": instances, "sem_seg": torch.full((12, 16), i % 3)}])
    writer.close([f"bad{rank}.png\tx"])
    if world > 1:
        dist.destroy_process_group()


def test_two_ranks_write_what_one_process_writes(tmp_path):
    _write_share(0, 1, str(tmp_path))
    mp.spawn(_write_share, args=(2, str(tmp_path)), nprocs=2, join=True)
    one, two = tmp_path / "out1", tmp_path / "out2"
    assert (one / "instances.json").read_text() == (two / "instances.json").read_text()
    assert (two / "skipped.txt").read_text() == "bad0.png\tx\nbad1.png\tx\n"
    files = _predicted_files(one)
    assert files == _predicted_files(two) and len(files) == 16  # 5 + 5 PNGs, 5 overlays, json
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)


def _predicted_files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name != "skipped.txt")
