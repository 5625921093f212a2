"""Panoptic data: the synthetic panoptic mode, the COCO panoptic writer and the COCO / Cityscapes loaders."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

from segtrain.data.datasets.panoptic import (
    CityscapesPanopticDataset,
    COCOPanopticDataset,
    id_to_rgb,
    panoptic_targets,
    rgb_to_id,
)
from segtrain.data.datasets.synthetic import SHAPES, STUFF, SyntheticDataset
from segtrain.data.export.panoptic import write_coco_panoptic
from segtrain.data.transforms.presets import instance_train_transforms

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"
COCO_SAMPLE = FIXTURES / "coco_panoptic_sample" / "sample_data"
INSTANCE_KEYS = ("masks", "labels", "boxes", "iscrowd")


def _panoptic_synthetic(num_samples: int = 8, **kwargs) -> SyntheticDataset:
    options = {"image_size": 48, "num_classes": 8, "stuff_classes": 3, "crowd_prob": 0.5, **kwargs}
    return SyntheticDataset(num_samples=num_samples, **options)


def _assert_same_target(actual: dict, expected: dict) -> None:
    assert actual.keys() >= expected.keys() - {"file_name"}
    for key, value in expected.items():
        if key == "segments":
            for name in ("ids", "classes", "iscrowd"):
                assert torch.equal(actual[key][name], value[name]), (key, name)
        elif isinstance(value, torch.Tensor):
            assert type(actual[key]) is type(value), key
            assert actual[key].dtype == value.dtype, key
            assert torch.equal(actual[key], value), key
        else:
            assert actual[key] == value, key


def _digest(dataset: SyntheticDataset, indices) -> str:
    h = hashlib.sha256()
    for i in indices:
        image, target = dataset[i]
        h.update(image.numpy().tobytes())
        for key in sorted(target):
            value = target[key]
            h.update(key.encode())
            raw = str(value).encode() if isinstance(value, int) else torch.as_tensor(value).numpy().tobytes()
            h.update(raw)
        h.update(str(dataset.meta.to_dict()).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------ synthetic
def test_default_synthetic_samples_are_bit_identical_to_before_the_panoptic_option():
    # Digests taken from synthetic.py before stuff_classes existed (torch 2.14 CPU kernels): the
    # opt-in must not move the default generator's draws or add keys.
    assert _digest(SyntheticDataset(num_samples=4, image_size=64), range(4)) == (
        "34755aaf95ae547a1fd7e4b9893b21f1d2dc1e33ac82b12d06e9c2bd3e8cfd4c"
    )
    varied = SyntheticDataset(
        "val", 3, image_size=(40, 56), num_classes=10, max_shapes=8, seed=3, void_border=2
    )
    assert _digest(varied, range(3)) == "92ca07e1b1f0eb651030b97f5258e09d97ab805f5da81a596e1797c6a0aee9c6"


def test_synthetic_panoptic_meta_lists_stuff_classes_then_shape_kinds():
    meta = _panoptic_synthetic(num_classes=9, stuff_classes=4).meta
    assert meta.classes == [row[0] for row in STUFF[:4]] + list(SHAPES[:5])
    assert meta.stuff_ids == [0, 1, 2, 3] and meta.thing_ids == [4, 5, 6, 7, 8]
    assert meta.category_ids == list(range(1, 10)) and meta.ignore_index == 255


def test_synthetic_panoptic_segments_list_exactly_the_ids_of_the_map():
    ds = _panoptic_synthetic(16, void_border=1)
    for index in range(len(ds)):
        image, target = ds[index]
        panoptic, segments = target["panoptic"], target["segments"]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
        assert isinstance(panoptic, tv_tensors.Mask) and panoptic.dtype == torch.int64
        assert panoptic.shape == image.shape[-2:]
        assert all(segments[k].dtype == torch.int64 for k in ("ids", "classes", "iscrowd"))
        ids = segments["ids"]
        present = set(torch.unique(panoptic).tolist()) - {0}
        assert sorted(ids.tolist()) == sorted(present)
        # Documented id scheme: category_id * 1000 + n.
        assert torch.equal(ids // 1000, segments["classes"] + 1)
        stuff = segments["classes"] < 3
        # One segment per stuff class present.
        assert len(set(segments["classes"][stuff].tolist())) == int(stuff.sum())
        assert not segments["iscrowd"][stuff].any()
        assert target["image_id"] == index and target["orig_size"].tolist() == [48, 48]


def test_synthetic_panoptic_semantic_and_instance_targets_derive_from_the_map():
    ds = _panoptic_synthetic(12, void_border=1)
    meta = ds.meta
    for index in range(len(ds)):
        _, target = ds[index]
        panoptic, segments = target["panoptic"], target["segments"]
        expected_semantic = torch.full_like(panoptic, 255)
        masks, labels = [], []
        for seg_id, cls, crowd in zip(*(segments[k].tolist() for k in ("ids", "classes", "iscrowd"))):
            expected_semantic[panoptic == seg_id] = cls
            if cls in meta.thing_ids and not crowd:
                masks.append(panoptic == seg_id)
                labels.append(meta.thing_ids.index(cls) + 1)
        assert isinstance(target["semantic"], tv_tensors.Mask)
        assert torch.equal(target["semantic"], expected_semantic)
        assert target["masks"].dtype == torch.bool and len(target["masks"]) == len(masks)
        if masks:
            assert torch.equal(target["masks"], torch.stack(masks))
        assert target["labels"].tolist() == labels
        assert torch.equal(target["iscrowd"], torch.zeros(len(labels), dtype=torch.int64))
        for mask, box in zip(masks, target["boxes"].tolist()):
            ys, xs = mask.nonzero(as_tuple=True)
            assert box == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert target["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY


def test_crowd_segments_are_listed_but_kept_out_of_instance_targets():
    ds = _panoptic_synthetic(8, crowd_prob=1.0)
    crowds = 0
    for index in range(len(ds)):
        _, target = ds[index]
        segments = target["segments"]
        crowd_ids = segments["ids"][segments["iscrowd"] == 1]
        crowds += len(crowd_ids)
        assert all(c >= 3 for c in segments["classes"][segments["iscrowd"] == 1].tolist())  # things
        things = (segments["classes"] >= 3) & (segments["iscrowd"] == 0)
        assert len(target["masks"]) == int(things.sum())
        for crowd_id in crowd_ids.tolist():
            region = target["panoptic"] == crowd_id
            assert not (target["masks"] & region).any()
    assert crowds >= 6  # a crowd is drawn in every image; occlusion may hide a few


def test_void_border_is_void_in_panoptic_and_ignored_in_semantic():
    _, target = _panoptic_synthetic(2, void_border=1)[1]
    _, plain_target = _panoptic_synthetic(2)[1]
    void = target["panoptic"] == 0
    assert void.any() and not (plain_target["panoptic"] == 0).any()
    assert torch.equal(void, target["semantic"] == 255)
    assert not target["masks"][:, void].any()


def test_synthetic_panoptic_is_a_function_of_seed_split_and_index():
    a, b = _panoptic_synthetic(4), _panoptic_synthetic(4)
    for index in (3, 0):
        image_a, target_a = a[index]
        image_b, target_b = b[index]
        assert torch.equal(image_a, image_b)
        _assert_same_target(target_a, target_b)
    val, other_seed = _panoptic_synthetic(4, split="val"), _panoptic_synthetic(4, seed=1)
    assert not torch.equal(a[0][0], val[0][0]) and not torch.equal(a[0][0], other_seed[0][0])


@pytest.mark.parametrize(
    "kwargs",
    [{"stuff_classes": 7}, {"num_classes": 3, "stuff_classes": 3}, {"crowd_prob": 1.5},
     {"stuff_classes": 0, "crowd_prob": 0.5}],
)
def test_panoptic_options_are_validated(kwargs):
    with pytest.raises(ValueError, match="SyntheticDataset"):
        _panoptic_synthetic(**kwargs)


def test_horizontal_flip_moves_panoptic_and_semantic_with_the_image():
    image, target = _panoptic_synthetic(1)[0]
    flipped_image, flipped = instance_train_transforms(hflip_prob=1.0)(image, target)
    assert torch.equal(flipped_image, image.flip(-1))
    for key in ("panoptic", "semantic", "masks"):
        assert isinstance(flipped[key], tv_tensors.Mask), key
        assert torch.equal(flipped[key], target[key].flip(-1)), key
    for name in ("ids", "classes", "iscrowd"):
        assert torch.equal(flipped["segments"][name], target["segments"][name])
    # Still one consistent target: the derived keys recomputed from the flipped map agree.
    segments = flipped["segments"]
    rebuilt = panoptic_targets(flipped["panoptic"], segments["ids"], segments["classes"], segments["iscrowd"],
                               _panoptic_synthetic(1).meta)
    for key in ("semantic", "masks", "labels", "boxes"):
        assert torch.equal(flipped[key], rebuilt[key]), key


# ------------------------------------------------------------------------------ writer + COCO panoptic
def test_rgb_to_id_inverts_id_to_rgb_for_ids_using_all_three_channels():
    ids = torch.tensor([[0, 1, 255, 256], [26001, 65535, 65536, 256**3 - 1]])
    rgb = id_to_rgb(ids)
    assert rgb.dtype == torch.uint8 and rgb[:, 1, 0].tolist() == [26001 % 256, 26001 // 256, 0]
    assert torch.equal(rgb_to_id(rgb), ids)


def test_written_coco_panoptic_reads_back_as_the_synthetic_targets(tmp_path):
    ds = _panoptic_synthetic(5, crowd_prob=0.6, void_border=1)
    ann = write_coco_panoptic(ds, tmp_path, split="val")
    assert ann == tmp_path / "annotations" / "panoptic_val2017.json"
    loaded = COCOPanopticDataset(root=tmp_path, split="val", num_classes=8)
    assert loaded.meta.to_dict() | {"palette": None} == ds.meta.to_dict() | {"palette": None}
    assert len(loaded) == len(ds)
    for index in range(len(ds)):
        image, target = loaded[index]
        expected_image, expected = ds[index]
        assert torch.equal(image, expected_image)
        _assert_same_target(target, expected)
        assert target["file_name"] == f"{index:012d}"


def test_written_json_follows_the_coco_panoptic_format(tmp_path):
    ds = _panoptic_synthetic(3, crowd_prob=1.0)
    data = json.loads(write_coco_panoptic(ds, tmp_path, split="train").read_text())
    categories = {c["id"]: c for c in data["categories"]}
    assert [categories[i]["isthing"] for i in range(1, 9)] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert all(len(c["color"]) == 3 and c["name"] for c in categories.values())
    for image_info, ann in zip(data["images"], data["annotations"]):
        assert ann["image_id"] == image_info["id"]
        assert (tmp_path / "train2017" / image_info["file_name"]).is_file()
        png = np.array(Image.open(tmp_path / "annotations" / "panoptic_train2017" / ann["file_name"]))
        assert png.dtype == np.uint8 and png.shape == (image_info["height"], image_info["width"], 3)
        rgb = png.astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
        _, target = ds[image_info["id"]]
        assert np.array_equal(ids, target["panoptic"].numpy())
        for seg in ann["segments_info"]:
            mask = ids == seg["id"]
            ys, xs = np.nonzero(mask)
            assert seg["area"] == int(mask.sum())
            assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert seg["category_id"] in categories and seg["iscrowd"] in (0, 1)
    assert any(seg["iscrowd"] for ann in data["annotations"] for seg in ann["segments_info"])


@pytest.fixture
def coco_tree(tmp_path):
    write_coco_panoptic(_panoptic_synthetic(2), tmp_path / "coco", split="val")
    return tmp_path / "coco"


def _edit_json(root: Path, edit) -> None:
    path = root / "annotations" / "panoptic_val2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        (None, "root .*coco.* is not a directory"),
        ("annotations/panoptic_val2017.json", "annotation file .*panoptic_val2017.json not found"),
        ("annotations/panoptic_val2017", "panoptic PNG folder .*panoptic_val2017 not found"),
        ("val2017", "image folder .*val2017 not found"),
        ("annotations/panoptic_val2017/000000000000.png", "panoptic PNG file .*000000000000.png not found"),
    ],
)
def test_a_missing_path_is_named_with_the_expected_tree(coco_tree, remove, message):
    target = coco_tree if remove is None else coco_tree / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=message) as info:
        COCOPanopticDataset(root=coco_tree, split="val")
    if remove != "annotations/panoptic_val2017/000000000000.png":
        assert "annotations/panoptic_val2017.json" in str(info.value)  # the layout expected


def test_a_png_missing_after_construction_is_named_when_read(coco_tree):
    ds = COCOPanopticDataset(root=coco_tree, split="val")
    (coco_tree / "annotations" / "panoptic_val2017" / "000000000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"000000000001.png not found .*image id 1"):
        ds[1]


def test_a_json_segment_absent_from_the_png_is_an_error_naming_both(coco_tree):
    def add_segment(data):
        data["annotations"][0]["segments_info"].append(
            {"id": 99999, "category_id": 4, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1}
        )

    _edit_json(coco_tree, add_segment)
    message = r"000000000000.png.*panoptic_val2017.json.*\[99999\].*cover no pixel"
    with pytest.raises(ValueError, match=message):
        COCOPanopticDataset(root=coco_tree, split="val")[0]


def test_a_png_segment_absent_from_the_json_is_an_error(coco_tree):
    dropped = []

    def drop_segment(data):
        dropped.append(data["annotations"][0]["segments_info"].pop()["id"])

    _edit_json(coco_tree, drop_segment)
    with pytest.raises(ValueError, match=rf"000000000000.png.*\[{dropped[0]}\] occur in the map but not"):
        COCOPanopticDataset(root=coco_tree, split="val")[0]


def test_a_category_count_mismatch_names_the_json_and_the_fix(coco_tree):
    with pytest.raises(ValueError, match=r"num_classes=133 but .*panoptic_val2017.json has 8 categories"):
        COCOPanopticDataset(root=coco_tree, split="val", num_classes=133)


def test_root_none_without_explicit_paths_says_what_to_pass():
    with pytest.raises(ValueError, match="dataset.root="):
        COCOPanopticDataset(root=None, split="val")


# ------------------------------------------------------------------------------ the real COCO sample
@pytest.mark.skipif(not COCO_SAMPLE.is_dir(), reason=f"real-data fixture {COCO_SAMPLE} is absent")
def test_real_coco_panoptic_sample_loads_and_matches_its_rle_version():
    # The sample's folders are named as in panopticapi's sample_data, so the paths are explicit.
    ds = COCOPanopticDataset(
        ann_file=COCO_SAMPLE / "panoptic_examples.json", png_dir=COCO_SAMPLE / "panoptic_examples",
        img_dir=COCO_SAMPLE / "input_images", num_classes=133,
    )
    assert len(ds) == 2 and len(ds.meta.thing_ids) == 80 and len(ds.meta.stuff_ids) == 53
    assert ds.meta.classes[0] == "person" and ds.meta.category_ids[-1] == 200
    # The same ground truth as RLE (pycocotools), segment for segment in the same order.
    rle = json.loads((COCO_SAMPLE / "panoptic_coco_detection_format.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in rle["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    crowds = 0
    for index in range(len(ds)):
        image, target = ds[index]
        anns = by_image[target["image_id"]]
        assert image.shape[-2:] == target["panoptic"].shape
        assert [ds.meta.category_id(c) for c in target["segments"]["classes"].tolist()] == [
            a["category_id"] for a in anns
        ]
        things = []
        for seg_id, ann in zip(target["segments"]["ids"].tolist(), anns):
            expected = torch.from_numpy(mask_utils.decode(ann["segmentation"])).bool()
            assert torch.equal(target["panoptic"] == seg_id, expected), ann["id"]
            is_thing = ds.meta.contiguous_id(ann["category_id"]) in ds.meta.thing_ids
            crowds += ann["iscrowd"]
            if is_thing and not ann["iscrowd"]:
                things.append((expected, ann))
        assert len(target["masks"]) == len(things)
        for mask, box, label, (expected, ann) in zip(target["masks"], target["boxes"].tolist(),
                                                     target["labels"].tolist(), things):
            x, y, w, h = ann["bbox"]
            assert torch.equal(mask, expected) and box == [x, y, x + w, y + h]
            assert ds.meta.thing_ids[label - 1] == ds.meta.contiguous_id(ann["category_id"])
        assert int((target["semantic"] == 255).sum()) == int((target["panoptic"] == 0).sum())
    assert crowds == 3  # crowd people and a crowd of category 19 stay out of the instance targets


# ------------------------------------------------------------------------------ Cityscapes panoptic
# (label id, name, isthing) of the 19 evaluated classes, as createPanopticImgs.py lists them.
CITYSCAPES = [
    (7, "road", 0), (8, "sidewalk", 0), (11, "building", 0), (12, "wall", 0), (13, "fence", 0),
    (17, "pole", 0), (19, "traffic light", 0), (20, "traffic sign", 0), (21, "vegetation", 0),
    (22, "terrain", 0), (23, "sky", 0), (24, "person", 1), (25, "rider", 1), (26, "car", 1),
    (27, "truck", 1), (28, "bus", 1), (31, "train", 1), (32, "motorcycle", 1), (33, "bicycle", 1),
]


def _write_cityscapes_panoptic(root: Path, split: str, frames: dict[str, np.ndarray]) -> None:
    """What createPanopticImgs.py writes for `frames` (name -> instanceIds array): ids < 1000 of
    thing classes are crowds, ignored label ids (here 0) stay VOID."""
    gt = root / "gtFine"
    (gt / f"cityscapes_panoptic_{split}").mkdir(parents=True)
    things = {cat_id for cat_id, _, isthing in CITYSCAPES if isthing}
    images, annotations = [], []
    for name, instance_ids in frames.items():
        city = name.split("_")[0]
        (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        rgb = np.full((*instance_ids.shape, 3), 40, dtype=np.uint8)
        rgb[..., 0] = instance_ids % 200
        Image.fromarray(rgb).save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
        images.append({"id": name, "width": instance_ids.shape[1], "height": instance_ids.shape[0],
                        "file_name": f"{name}_leftImg8bit.png"})
        pan = np.zeros((*instance_ids.shape, 3), dtype=np.uint8)
        segments = []
        for segment_id in np.unique(instance_ids).tolist():
            label = segment_id if segment_id < 1000 else segment_id // 1000
            if label == 0:
                continue
            mask = instance_ids == segment_id
            pan[mask] = [segment_id % 256, segment_id // 256, segment_id // 256 // 256]
            ys, xs = np.nonzero(mask)
            segments.append({"id": segment_id, "category_id": label, "area": int(mask.sum()),
                             "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
                             "iscrowd": int(segment_id < 1000 and label in things)})
        Image.fromarray(pan).save(gt / f"cityscapes_panoptic_{split}" / f"{name}_gtFine_panoptic.png")
        annotations.append({"image_id": name, "file_name": f"{name}_gtFine_panoptic.png",
                            "segments_info": segments})
    categories = [{"id": i, "name": n, "color": [i, i, i], "supercategory": "x", "isthing": t}
                  for i, n, t in CITYSCAPES]
    (gt / f"cityscapes_panoptic_{split}.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )


def test_cityscapes_panoptic_reads_the_create_panoptic_imgs_layout(tmp_path):
    frame = np.zeros((12, 16), dtype=np.int64)
    frame[:4] = 23                      # sky
    frame[4:, :8] = 7                   # road
    frame[6:9, 1:5] = 26001             # a car
    frame[6:10, 9:12] = 24000           # a person
    frame[9:12, 12:16] = 26             # a crowd of cars
    other = np.full((12, 16), 8, dtype=np.int64)  # sidewalk, and a car
    other[2:5, 3:7] = 26000
    _write_cityscapes_panoptic(tmp_path, "val", {"frankfurt_000000_000294": frame,
                                                 "lindau_000001_000019": other})
    ds = CityscapesPanopticDataset(root=tmp_path, split="val", num_classes=19)
    meta = ds.meta
    assert meta.classes[:2] == ["road", "sidewalk"] and meta.category_ids == [c for c, _, _ in CITYSCAPES]
    assert meta.thing_ids == list(range(11, 19)) and len(meta.stuff_ids) == 11
    assert ds.json_image_ids == ["frankfurt_000000_000294", "lindau_000001_000019"]
    image, target = ds[0]
    assert target["image_id"] == 0 and target["file_name"] == "frankfurt_000000_000294_gtFine_panoptic"
    assert torch.equal(image[0], torch.from_numpy(frame % 200).to(torch.uint8))  # read from the city folder
    assert torch.equal(target["panoptic"], torch.from_numpy(frame))
    segments = target["segments"]
    contiguous = {cat: k for k, cat in enumerate(meta.category_ids)}
    assert segments["classes"].tolist() == [contiguous[i if i < 1000 else i // 1000]
                                            for i in segments["ids"].tolist()]
    assert dict(zip(segments["ids"].tolist(), segments["iscrowd"].tolist())) == {
        7: 0, 23: 0, 26: 1, 24000: 0, 26001: 0
    }
    assert target["labels"].tolist() == [1, 3]  # person, car: 1 + index in thing_ids; crowd left out
    assert target["boxes"].tolist() == [[9, 6, 12, 10], [1, 6, 5, 9]]
    assert int((target["semantic"] == 255).sum()) == int((frame[4:, 8:] == 0).sum())
    assert ds[1][1]["image_id"] == 1 and ds[1][1]["labels"].tolist() == [3]


def test_cityscapes_missing_json_names_the_expected_gtfine_layout(tmp_path):
    (tmp_path / "gtFine").mkdir()
    message = r"(?s)cityscapes_panoptic_val.json not found.*createPanopticImgs"
    with pytest.raises(FileNotFoundError, match=message):
        CityscapesPanopticDataset(root=tmp_path, split="val")


# ------------------------------------------------------------------------------ configs
def test_synthetic_panoptic_config_builds_a_panoptic_dataset(compose_cfg):
    cfg = compose_cfg("train", ["dataset=synthetic_panoptic", "dataset.train.num_samples=2"])
    train = instantiate(cfg.dataset.train)
    assert train.meta.num_classes == cfg.dataset.num_classes
    counts = (len(train.meta.thing_ids), len(train.meta.stuff_ids))
    assert counts == (cfg.dataset.num_things, cfg.dataset.num_stuff)
    image, target = train[0]
    assert image.shape[-2:] == (64, 64) and {"panoptic", "segments", "semantic", "masks"} <= target.keys()
    val = instantiate(cfg.dataset.val)
    assert (val[0][1]["panoptic"] == 0).any()  # the val split has VOID outlines
