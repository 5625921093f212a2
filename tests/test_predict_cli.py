"""`segtrain predict` end to end, as a user types it: on a dataset's validation images written to
disk, predict + `segtrain score` gives `segtrain eval`'s numbers (semantic, instance, panoptic);
unreadable files are skipped and listed; existing outputs are not overwritten."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading

import pytest
from conftest import TINY, run_cli
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from segtrain.data.export.coco import write_coco_instances
from segtrain.data.export.panoptic import write_coco_panoptic
from segtrain.data.export.semantic import export_semantic

pytestmark = pytest.mark.slow

# 40 steps: enough for some AP and PQ (things and stuff) above 0, so that a prediction paired
# with the wrong ground-truth image would show.
INSTANCE_TINY = [
    "model=maskrcnn_small", "dataset=synthetic_instance", "dataset.train.num_samples=8",
    "dataset.val.num_samples=4", "dataset.train.image_size=64", "dataset.val.image_size=64",
    "model.min_size=64", "model.max_size=64", "model.box_score_thresh=0.0", "data.batch_size=2",
    "data.num_workers=0", "optimizer=adamw", "optimizer.lr=0.002", "trainer.max_iters=40",
    "trainer.eval_every=40", "trainer.device=cpu", "trainer.vis_images=1",
]
PANOPTIC_TINY = [
    "experiment=synthetic_panoptic_fpn", "dataset.train.num_samples=8", "dataset.val.num_samples=4",
    "model.min_size=64", "model.max_size=64", "data.batch_size=2", "data.num_workers=0",
    "trainer.max_iters=40", "trainer.eval_every=40", "trainer.device=cpu", "trainer.vis_images=1",
    "task.instance_score_thresh=0.0", "task.stuff_area_thresh=1",
]


def _val_set(overrides: list[str]):
    """The validation set a run with `overrides` evaluates on, built from the same config."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="segtrain.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    GlobalHydra.instance().clear()
    return instantiate(cfg.dataset.val)


def _train_and_eval(work, overrides):
    """Train a tiny run, evaluate its last.pt; returns (checkpoint, eval metrics)."""
    trained = run_cli("train", *overrides, f"hydra.run.dir={work / 'run'}", cwd=work)
    assert trained.returncode == 0, trained.stderr
    ckpt = work / "run" / "checkpoints" / "last.pt"
    evaluated = run_cli("eval", f"ckpt={ckpt}", f"output={work / 'eval.json'}", cwd=work)
    assert evaluated.returncode == 0, evaluated.stderr
    return ckpt, json.loads((work / "eval.json").read_text())


def _predict(work, ckpt, images, *extra):
    result = run_cli("predict", f"ckpt={ckpt}", f"input={images}", f"output={work / 'out'}", *extra, cwd=work)
    assert result.returncode == 0, result.stderr
    return work / "out", result


def _score(work, *args):
    result = run_cli("score", *args, f"output={work / 'score.json'}", cwd=work)
    assert result.returncode == 0, result.stderr
    return json.loads((work / "score.json").read_text())


def _assert_close(score: dict, evaluation: dict, keys) -> None:
    """Equal to 1e-6; NaN (written null) only where the other is NaN too."""
    for key in keys:
        a, b = (math.nan if v is None else v for v in (score[key], evaluation[key]))
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6), (key, a, b)


@pytest.fixture(scope="module")
def semantic_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("semantic")
    ckpt, metrics = _train_and_eval(work, TINY)
    export_semantic(_val_set(TINY), work / "data")
    return work, ckpt, metrics


def test_semantic_predict_then_score_equals_eval(semantic_run):
    work, ckpt, metrics = semantic_run
    out, result = _predict(work, ckpt, work / "data" / "images", "batch_size=4", "num_workers=2")
    assert "predicted 8 images" in result.stdout + result.stderr
    assert len(list((out / "overlays").glob("*.jpg"))) == 8
    scored = _score(work, "task=semantic", f"gt={work / 'data' / 'labels'}", f"pred={out / 'semantic'}",
                    "num_classes=6")
    for key in ("mIoU", "aAcc", "mAcc", "fwIoU"):
        assert scored["semantic"][key] == metrics["semantic"][key], key  # exactly


def test_unreadable_files_are_skipped_listed_and_counted(semantic_run, tmp_path):
    work, ckpt, _ = semantic_run
    images = tmp_path / "images"
    images.mkdir()
    for name in ("000000.png", "000001.png", "000002.png"):
        (images / name).write_bytes((work / "data" / "images" / name).read_bytes())
    (images / "000001.png").write_bytes((images / "000001.png").read_bytes()[:60])  # truncated
    (images / "empty.jpg").write_bytes(b"")
    result = run_cli("predict", f"ckpt={ckpt}", f"input={images}", f"output={tmp_path / 'out'}",
                     "num_workers=2", "batch_size=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    log = result.stdout + result.stderr
    assert "predicted 2 images" in log and "skipped 2 files" in log and "empty.jpg" in log
    listed = (tmp_path / "out" / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [str(images / "000001.png"), str(images / "empty.jpg")]
    assert sorted(p.name for p in (tmp_path / "out" / "semantic").iterdir()) == ["000000.png", "000002.png"]


def test_existing_predictions_are_not_overwritten_without_overwrite(semantic_run, tmp_path):
    work, ckpt, _ = semantic_run
    image = work / "data" / "images" / "000003.png"
    first = run_cli("predict", f"ckpt={ckpt}", f"input={image}", f"output={tmp_path / 'out'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    again = run_cli("predict", f"ckpt={ckpt}", f"input={image}", f"output={tmp_path / 'out'}", cwd=tmp_path)
    assert again.returncode == 1
    assert "already holds predictions" in again.stderr and "overwrite=true" in again.stderr
    assert "Traceback" not in again.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    forced = run_cli("predict", f"ckpt={ckpt}", f"input={image}", f"output={tmp_path / 'out'}",
                     "overwrite=true", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr


def test_two_torchrun_ranks_write_what_one_process_writes(semantic_run, tmp_path):
    work, ckpt, _ = semantic_run
    args = [f"ckpt={ckpt}", f"input={work / 'data' / 'images'}", "batch_size=3", "num_workers=1"]
    single = run_cli("predict", *args, f"output={tmp_path / 'one'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SEGTRAIN_DEBUG", None)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "segtrain", "predict", *args, f"output={tmp_path / 'two'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert one == two and len(one) == 17  # 8 label PNGs, 8 overlays, skipped.txt
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in one)


def test_ctrl_c_ends_predict_and_its_workers_with_status_130(semantic_run, tmp_path):
    from test_bad_inputs_failures import run_to_exit

    work, ckpt, _ = semantic_run
    source = (work / "data" / "images" / "000000.png").read_bytes()
    images = tmp_path / "many"
    images.mkdir()
    for i in range(400):
        (images / f"{i:04d}.png").write_bytes(source)

    def interrupt(line, proc):
        if "predicting 400 images" in line:
            threading.Timer(1.0, proc.send_signal, [signal.SIGINT]).start()

    args = ["predict", f"ckpt={ckpt}", f"input={images}", f"output={tmp_path / 'out'}", "batch_size=1",
            "num_workers=2"]
    code, out, _ = run_to_exit(args, tmp_path, token=str(images), on_line=interrupt)
    assert code == 130, out[-2000:]
    assert "interrupted (Ctrl-C): segtrain predict stopped" in out
    assert not (tmp_path / "out" / "skipped.txt").exists()  # the run did not finish


@pytest.mark.parametrize("spec", ["nothing/*.png", "missing_dir"])
def test_an_input_naming_no_image_is_an_error_naming_it(semantic_run, tmp_path, spec):
    _, ckpt, _ = semantic_run
    result = run_cli("predict", f"ckpt={ckpt}", f"input={tmp_path / spec}", f"output={tmp_path / 'out'}",
                     cwd=tmp_path)
    assert result.returncode == 1 and f"input={tmp_path / spec}" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_instance_predict_then_score_equals_eval(tmp_path):
    ckpt, metrics = _train_and_eval(tmp_path, INSTANCE_TINY)
    assert metrics["segm"]["AP50"] > 0 and metrics["bbox"]["AP50"] > 0, "the test needs some AP"
    gt_json = write_coco_instances(_val_set(INSTANCE_TINY), tmp_path / "coco")
    out, _ = _predict(tmp_path, ckpt, tmp_path / "coco" / "val2017", "batch_size=2", "overlay=false")
    data = json.loads((out / "instances.json").read_text())
    assert len(data["images"]) == 4 and data["annotations"], "the test needs detections"
    scored = _score(tmp_path, "task=instance", f"gt={gt_json}", f"pred={out / 'instances.json'}",
                    "area_from=mask")
    for family in ("segm", "bbox"):
        _assert_close(scored[family], metrics[family], [k for k in metrics[family] if k != "per_class"])


def test_panoptic_predict_then_score_equals_eval(tmp_path):
    ckpt, metrics = _train_and_eval(tmp_path, PANOPTIC_TINY)
    assert metrics["panoptic"]["PQ_th"] > 0 and metrics["panoptic"]["PQ_st"] > 0, "the test needs some PQ"
    gt_json = write_coco_panoptic(_val_set(PANOPTIC_TINY), tmp_path / "coco")
    out, _ = _predict(tmp_path, ckpt, tmp_path / "coco" / "val2017", "batch_size=2", "num_workers=0")
    assert len(list((out / "panoptic").glob("*.png"))) == 4
    scored = _score(tmp_path, "task=panoptic", f"gt={gt_json}", f"gt_dir={gt_json.with_suffix('')}",
                    f"pred={out / 'panoptic.json'}", f"pred_dir={out / 'panoptic'}")
    _assert_close(scored["panoptic"], metrics["panoptic"],
                  [k for k in metrics["panoptic"] if k != "per_class"])
