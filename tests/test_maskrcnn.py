"""Mask R-CNN builder: every backbone, torchvision-compatible keys, offline weights, head re-init."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from torchvision.models import get_weight
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2
from torchvision.ops import FrozenBatchNorm2d

from segtrain.models.maskrcnn import BACKBONES, PREDICTOR_HEADS, build_maskrcnn

pytestmark = pytest.mark.usefixtures("no_downloads")  # any weight download fails the test

# 64-pixel inputs and a handful of proposals: any backbone runs in about a second on a CPU.
TINY = {"min_size": 64, "max_size": 64, "rpn_pre_nms_top_n_train": 50, "rpn_post_nms_top_n_train": 20,
        "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20, "box_batch_size_per_image": 16,
        "representation_size": 64, "mask_head_channels": 16}


def _hub_file(name: str) -> str:
    return Path(urlparse(get_weight(name).url).path).name


def _tiny(num_classes: int = 6, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_maskrcnn(num_classes, **{"backbone": "resnet18", **TINY, **kwargs})


@pytest.mark.parametrize(("backbone", "version"), [*((b, 1) for b in BACKBONES), ("resnet18", 2)])
def test_every_backbone_predicts_per_image_boxes_labels_scores_and_masks(backbone, version):
    model = _tiny(backbone=backbone, version=version).eval()
    sizes = [(64, 48), (40, 64)]
    torch.manual_seed(1)
    with torch.no_grad():
        outputs = model([torch.rand(3, *size) for size in sizes])
    assert len(outputs) == 2
    for output, size in zip(outputs, sizes):
        n = len(output["scores"])
        assert output["boxes"].shape == (n, 4) and output["labels"].dtype == torch.int64
        assert output["masks"].shape == (n, 1, *size)  # pasted at the input image size
        assert ((output["labels"] >= 1) & (output["labels"] < 6)).all()
    assert model.roi_heads.box_predictor.cls_score.out_features == 6
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 6


def test_head_sizes_and_inference_thresholds_reach_the_model():
    with torch.device("meta"):
        model = build_maskrcnn(6, representation_size=512, mask_head_channels=128,
                               box_score_thresh=0.3, box_nms_thresh=0.6, box_detections_per_img=42,
                               box_batch_size_per_image=128, rpn_post_nms_top_n_test=300)
    heads = model.roi_heads
    assert heads.box_head.fc7.out_features == 512 and heads.mask_head[0][0].out_channels == 128
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.3, 0.6, 42)
    assert heads.fg_bg_sampler.batch_size_per_image == 128
    assert model.rpn._post_nms_top_n["testing"] == 300
    assert (model.transform.min_size, model.transform.max_size) == ((800,), 1333)


@pytest.mark.parametrize(("version", "reference"), [(1, maskrcnn_resnet50_fpn),
                                                     (2, maskrcnn_resnet50_fpn_v2)])
def test_state_dict_matches_torchvision_so_coco_checkpoints_load(version, reference):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        ours = build_maskrcnn(91, version=version).state_dict()
        theirs = reference(weights=None, weights_backbone=None, num_classes=91).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_coco_checkpoint_for_other_classes_reinitialises_only_the_predictors(tmp_path, caplog):
    source = _tiny(num_classes=91, seed=0)
    torch.save(source.state_dict(), tmp_path / "coco.pth")
    with caplog.at_level(logging.INFO, logger="segtrain.models.weights"):
        model = _tiny(num_classes=6, seed=1, weights=str(tmp_path / "coco.pth"))
    file_state = source.state_dict()
    reinit = []
    for key, value in model.state_dict().items():
        if key.startswith(PREDICTOR_HEADS):
            # one output per class (cls_score, mask_fcn_logits) or four (bbox_pred)
            assert value.shape[0] in (6, 24) and file_state[key].shape[0] in (91, 364), key
            reinit.append(key)
        else:
            assert torch.equal(value, file_state[key]), key
    assert len(reinit) == 6  # cls_score, bbox_pred and mask_fcn_logits, weight and bias
    assert "re-initialised 6 keys" in caplog.text and all(key in caplog.text for key in reinit)
    # A pretrained v1 model freezes its BatchNorm statistics, as torchvision does.
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)


def test_torchvision_weights_missing_from_the_cache_name_the_hub_path(hub_cache):
    name = "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"
    with pytest.raises(FileNotFoundError) as info:
        build_maskrcnn(6, weights=name)
    assert str(hub_cache / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth") in str(info.value)
    assert "model.weights=/path/to/file.pth" in str(info.value)


def test_coco_weights_in_the_cache_load_by_name(hub_cache):
    name = "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"
    with torch.device("meta"):
        shapes = build_maskrcnn(91, weights=None).state_dict()
    # The real file's keys and shapes, small values: R50 at 91 classes, stored as zeros.
    torch.save({k: torch.zeros(v.shape) for k, v in shapes.items()}, hub_cache / _hub_file(name))
    model = build_maskrcnn(6, weights=name, min_size=64, max_size=64)
    assert all(v.abs().sum() == 0 for k, v in model.state_dict().items()
               if not k.startswith(PREDICTOR_HEADS))


@pytest.mark.parametrize(("backbone", "name", "prefix"), [
    ("resnet18", "ResNet18_Weights.IMAGENET1K_V1", ""),
    ("mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V1", "features."),
])
def test_imagenet_weights_load_into_the_backbone_body(hub_cache, backbone, name, prefix):
    torch.manual_seed(0)
    classifier = getattr(torchvision.models, backbone)()
    torch.save(classifier.state_dict(), hub_cache / _hub_file(name))
    model = _tiny(backbone=backbone, weights_backbone=name, trainable_layers=2)
    source = classifier.state_dict()
    body = model.backbone.body.state_dict()
    assert body and all(torch.equal(value, source[prefix + key]) for key, value in body.items())
    frozen = [n for n, p in model.backbone.body.named_parameters() if not p.requires_grad]
    assert frozen, "stages below trainable_layers stay frozen"


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"backbone": "vgg16"}, "resnet18, resnet34, resnet50, resnet101, mobilenet_v3_large"),
    ({"version": 3}, "model.version=3"),
    ({"num_classes": 1}, "num_classes=1"),
])
def test_invalid_options_are_value_errors_naming_the_choices(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_maskrcnn(**{"num_classes": 6, **kwargs})


def test_trainable_layers_out_of_range_with_pretrained_backbone_is_an_error(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="trainable_layers=7"):
        build_maskrcnn(6, backbone="resnet18", weights_backbone=str(tmp_path / "r18.pth"),
                       trainable_layers=7)
