"""`segtrain export` and `segtrain predict ckpt=model.onnx` through the command line, as a user types
them: the ONNX file predicts the same label PNGs / instances.json as the checkpoint, through the
same writers; errors end the process with a one-paragraph message and leave no file behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pycocotools.mask as mask_util
import pytest
import torch
from conftest import run_cli
from test_export import MASKRCNN, SHRINK, SMALL_DATA, make_checkpoint
from torchvision.io import write_png

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_downloads")]
pytest.importorskip("onnxruntime", reason="the export extra: pip install 'segtrain[export]'")


def _images(folder: Path, sizes) -> Path:
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate(sizes):
        pixels = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
        write_png(pixels, str(folder / f"im{i}.png"))
    return folder


def _predict(work: Path, ckpt: Path, images: Path, name: str) -> Path:
    result = run_cli("predict", f"ckpt={ckpt}", f"input={images}", f"output={work / name}", "overlay=false",
                     "num_workers=0", cwd=work)
    assert result.returncode == 0, result.stderr
    return work / name


def test_onnx_predicts_the_same_label_pngs_as_the_checkpoint(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt", ["model=fcn", *SMALL_DATA, *SHRINK["fcn"]])
    exported = run_cli("export", f"ckpt={ckpt}", "format=onnx", "dynamic_size=true", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert "label map agreement  100.000%" in exported.stdout and "image size dynamic" in exported.stdout
    images = _images(tmp_path / "images", [(64, 64), (50, 70), (81, 40)])
    eager, onnx = (_predict(tmp_path, path, images, name) for path, name in
                   ((ckpt, "out_pt"), (tmp_path / "m.onnx", "out_onnx")))
    for stem in ("im0", "im1", "im2"):
        png = f"semantic/{stem}.png"
        assert (eager / png).read_bytes() == (onnx / png).read_bytes()


def test_onnx_maskrcnn_predicts_the_same_instances_json_as_the_checkpoint(tmp_path):
    ckpt = make_checkpoint(tmp_path / "r.pt", MASKRCNN)
    exported = run_cli("export", f"ckpt={ckpt}", "format=onnx", f"output={tmp_path / 'r.onnx'}", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    images = _images(tmp_path / "images", [(64, 64), (48, 72)])
    eager, onnx = (json.loads((_predict(tmp_path, path, images, name) / "instances.json").read_text())
                   for path, name in ((ckpt, "out_pt"), (tmp_path / "r.onnx", "out_onnx")))
    assert eager["images"] == onnx["images"] and eager["categories"] == onnx["categories"]
    a, b = eager["annotations"], onnx["annotations"]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert (x["image_id"], x["category_id"]) == (y["image_id"], y["category_id"])
        assert x["score"] == pytest.approx(y["score"], abs=1e-4)
        assert x["bbox"] == pytest.approx(y["bbox"], abs=0.05)
        assert mask_util.iou([x["segmentation"]], [y["segmentation"]], [0])[0, 0] > 0.99


def test_cli_errors_are_one_paragraph_and_leave_no_file(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt", ["model=unet", *SMALL_DATA, *SHRINK["unet"]])
    missing = run_cli("export", f"ckpt={tmp_path / 'nope.pt'}", cwd=tmp_path)
    assert missing.returncode == 1 and "nope.pt: checkpoint file not found" in missing.stderr
    (tmp_path / "script.ts").write_bytes(b"not read")
    images = _images(tmp_path / "i", [(32, 32)])
    refused = run_cli("predict", f"ckpt={tmp_path / 'script.ts'}", f"input={images}",
                      f"output={tmp_path / 'out'}", cwd=tmp_path)
    assert refused.returncode == 1 and "runs segtrain checkpoints (.pt) and ONNX exports" in refused.stderr
    for result in (missing, refused):
        assert "Traceback" not in result.stderr
    # Without onnxruntime (hidden from the import system): the message names the extra to install.
    code = ("import sys\nsys.modules['onnxruntime'] = None\nfrom segtrain.cli import main\n"
            f"main(['export', 'ckpt={ckpt}', 'format=onnx'])")
    hidden = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert hidden.returncode == 1 and "pip install 'segtrain[export]'" in hidden.stderr, hidden.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["m.pt", "script.ts"]
