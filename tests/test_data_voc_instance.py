"""VOC 2012 instances from SegmentationObject + SegmentationClass: targets, errors, config, CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from hydra.utils import instantiate
from PIL import Image
from torchvision import tv_tensors

from segtrain.data.codecs.image_io import write_label
from segtrain.data.datasets.voc import VOC_CLASSES
from segtrain.data.datasets.voc_instance import VOCInstanceSegmentation, voc_instance_meta
from segtrain.data_check import check_split
from segtrain.tasks.instance import InstanceTask

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from make_fixtures import VOC_PALETTE, write_voc  # noqa: E402

STEM = "2007_000000"  # the only name in train.txt of write_voc(n=2)
# Hand-drawn objects (id: class, rows y0:y1, columns x0:x1), each framed by a 1-pixel 255 outline.
DRAWN = {1: (15, (2, 8), (3, 11)), 2: (7, (12, 18), (14, 22)), 3: (15, (14, 20), (24, 30))}


def _png(path: Path) -> np.ndarray:
    """Stored values read with PIL alone (palette indices, not colours)."""
    return np.array(Image.open(path)).astype(np.int64)


def _draw(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A 2-image VOC tree whose train image carries the DRAWN objects; (class PNG, object PNG,
    class map, object map)."""
    write_voc(tmp_path, n=2)
    classes, objects = np.zeros((24, 32), np.int64), np.zeros((24, 32), np.int64)
    for object_id, (cls, (y0, y1), (x0, x1)) in DRAWN.items():
        for label, value in ((classes, cls), (objects, object_id)):
            label[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = 255
            label[y0:y1, x0:x1] = value
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    class_png, object_png = (voc / d / f"{STEM}.png" for d in ("SegmentationClass", "SegmentationObject"))
    write_label(class_png, classes, palette=VOC_PALETTE)
    write_label(object_png, objects, palette=VOC_PALETTE)
    return class_png, object_png, classes, objects


def test_drawn_objects_give_their_masks_boxes_and_classes(tmp_path):
    _, _, classes, objects = _draw(tmp_path)
    image, target = VOCInstanceSegmentation(tmp_path, "train")[0]
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, 24, 32)
    assert target["labels"].tolist() == [15, 7, 15] and target["labels"].dtype == torch.int64
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    assert target["boxes"].tolist() == [[3, 2, 11, 8], [14, 12, 22, 18], [24, 14, 30, 20]]
    assert isinstance(target["masks"], tv_tensors.Mask) and target["masks"].dtype == torch.bool
    for mask, (_, (y0, y1), (x0, x1)) in zip(target["masks"], DRAWN.values()):
        expected = torch.zeros(24, 32, dtype=torch.bool)
        expected[y0:y1, x0:x1] = True
        assert torch.equal(mask, expected)
    assert target["iscrowd"].tolist() == [0, 0, 0]
    assert torch.equal(target["semantic"], torch.from_numpy(classes))
    assert target["image_id"] == 0 and target["orig_size"].tolist() == [24, 32]
    assert target["file_name"] == STEM
    border = torch.from_numpy(objects == 255)
    assert border.any() and not (target["masks"] & border).any()


def test_fixture_objects_match_the_written_object_and_class_pngs(tmp_path):
    write_voc(tmp_path, n=6)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    dataset = VOCInstanceSegmentation(tmp_path, "trainval")
    assert len(dataset) == 6
    for index in range(len(dataset)):
        _, target = dataset[index]
        objects = _png(voc / "SegmentationObject" / f"{target['file_name']}.png")
        classes = _png(voc / "SegmentationClass" / f"{target['file_name']}.png")
        assert Image.open(voc / "SegmentationObject" / f"{target['file_name']}.png").mode == "P"
        ids = [i for i in np.unique(objects) if i not in (0, 255)]
        assert ids == list(range(1, len(ids) + 1)) and ids  # VOC numbers its objects 1..N
        assert np.array_equal(target["masks"].numpy(), np.stack([objects == i for i in ids]))
        assert target["labels"].tolist() == [int(np.unique(classes[objects == i]).item()) for i in ids]
        for box, mask in zip(target["boxes"].tolist(), target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert not target["masks"].any(0)[torch.from_numpy(objects == 255)].any()
        assert ((classes == 255) == (objects == 255)).all()  # the fixture's two maps agree


def test_meta_has_the_20_voc_object_classes_as_things():
    meta = voc_instance_meta()
    assert meta.classes == list(VOC_CLASSES) and meta.num_classes == 21
    assert meta.thing_ids == list(range(1, 21)) and meta.stuff_ids == [0]
    assert meta.ignore_index == 255 and meta.palette[15] == (192, 128, 128)


@pytest.mark.parametrize(("value", "shown"), [(9, "7 (car), 9 (chair)"), (255, "255 (void)"),
                                              (0, "0 (background)")])
def test_object_over_another_class_names_both_files_and_the_object(tmp_path, value, shown):
    class_png, object_png, classes, _ = _draw(tmp_path)
    classes[13, 15] = value  # a pixel of object 2 (car)
    write_label(class_png, classes, palette=VOC_PALETTE)
    dataset = VOCInstanceSegmentation(tmp_path, "train")
    with pytest.raises(ValueError, match="object 2 covers") as info:
        dataset[0]
    message = str(info.value)
    assert str(object_png) in message and str(class_png) in message and shown in message


def test_missing_object_mask_names_the_folder_and_shows_the_tree(tmp_path):
    _, object_png, _, _ = _draw(tmp_path)
    object_png.unlink()
    with pytest.raises(FileNotFoundError) as info:
        VOCInstanceSegmentation(tmp_path, "train")
    message = str(info.value)
    assert str(object_png.parent) in message and f"{STEM}.png" in message
    assert "SegmentationObject/<name>.png" in message and "SegmentationClass/<name>.png" in message


def test_object_map_of_another_size_names_both_files(tmp_path):
    _, object_png, _, _ = _draw(tmp_path)
    write_label(object_png, np.zeros((5, 7), np.int64), palette=VOC_PALETTE)
    with pytest.raises(ValueError, match=f"{object_png}.*JPEGImages"):
        VOCInstanceSegmentation(tmp_path, "train")[0]


def test_data_check_counts_the_objects_without_problems(tmp_path):
    _draw(tmp_path)
    stats = check_split(VOCInstanceSegmentation(tmp_path, "train"), "train")
    assert not stats.problems and stats.instances == [3]
    assert stats.instances_of[15] == 2 and stats.instances_of[7] == 1


def test_config_builds_flipping_train_set_and_an_evaluator_that_scores_the_truth_100(
    compose_cfg, tmp_path
):
    write_voc(tmp_path, n=4)
    cfg = compose_cfg("train", ["model=maskrcnn_small", "dataset=voc_instance", f"dataset.root={tmp_path}"])
    train, val = instantiate(cfg.dataset.train), instantiate(cfg.dataset.val)
    assert type(train) is VOCInstanceSegmentation and len(train) == len(val) == 2
    image, target = train[0]
    assert target["masks"].shape[-2:] == image.shape[-2:] and len(target["masks"]) == len(target["labels"])
    task = instantiate(cfg.task, _partial_=True)(meta=val.meta)
    assert isinstance(task, InstanceTask)
    batch = task.collate([val[0], val[1]])
    assert all(len(t["labels"]) for t in batch["train_targets"])
    evaluator = task.build_evaluator()
    predictions = [{"instances": {"masks": t["masks"], "boxes": t["boxes"].float(), "labels": t["labels"],
                                  "scores": torch.ones(len(t["labels"]))}} for t in batch["targets"]]
    evaluator.process(batch["targets"], predictions)
    metrics = evaluator.compute()
    assert metrics["segm"]["AP"] == pytest.approx(100.0) and metrics["bbox"]["AP"] == pytest.approx(100.0)
    present = {VOC_CLASSES[k] for t in batch["targets"] for k in t["labels"].tolist()}
    assert {name for name, v in metrics["segm"]["per_class"].items() if v["AP"] == v["AP"]} == present


@pytest.mark.slow
def test_data_check_command_reads_every_voc_instance_item(tmp_path):
    write_voc(tmp_path / "data", n=4)
    result = run_cli("data", "check", "dataset=voc_instance", f"dataset.root={tmp_path / 'data'}",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train: 2 images (2 checked, 0 problems)" in result.stdout
    assert "instances per image" in result.stdout
    assert "dataset=voc_instance: no problems found" in result.stdout


@pytest.mark.slow
def test_maskrcnn_trains_and_evaluates_mask_ap_on_voc_instances_through_the_cli(tmp_path):
    write_voc(tmp_path / "data", n=4)
    run_dir = tmp_path / "run"
    trained = run_cli(
        "train", "model=maskrcnn_small", "dataset=voc_instance", f"dataset.root={tmp_path / 'data'}",
        "model.min_size=64", "model.max_size=64", "data.batch_size=2", "data.num_workers=0",
        "trainer.max_iters=2", "trainer.eval_every=2", "trainer.device=cpu", "trainer.vis_images=1",
        f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"segm", "bbox"} <= metrics.keys() and "AP" in metrics["segm"]
    assert set(metrics["segm"]["per_class"]) == set(VOC_CLASSES[1:])
    results = json.loads((run_dir / "coco_instances_results.json").read_text())
    assert all(1 <= r["category_id"] <= 20 for r in results)

    evaluated = run_cli("eval", f"ckpt={run_dir / 'checkpoints' / 'last.pt'}",
                        f"output={tmp_path / 'eval'}", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics
