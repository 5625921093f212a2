"""End-to-end through the real command line, as a user types it (CPU, tiny configs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, run_cli, score_loads_torch

from segtrain.utils.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow


def _train(run_dir, *extra, cwd):
    return run_cli("train", *TINY, f"hydra.run.dir={run_dir}", *extra, cwd=cwd)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny training run shared by the tests that only read its outputs."""
    work = tmp_path_factory.mktemp("run")
    result = _train(work / "run", cwd=work)
    assert result.returncode == 0, result.stderr
    return work, work / "run", result


def test_help_lists_the_commands(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("train", "eval", "score"):
        assert f"  {command}" in result.stdout


@pytest.mark.parametrize("command", ["train", "eval", "score"])
def test_each_command_has_hydra_help_with_its_groups(tmp_path, command):
    result = run_cli(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"segtrain {command} is powered by Hydra" in result.stdout
    assert "loss: ce, ce_dice, dice, focal, lovasz, ohem_ce" in result.stdout


def test_unknown_command_lists_valid_ones(tmp_path):
    result = run_cli("trian", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown command 'trian'" in result.stderr and "train, eval, predict, score" in result.stderr


def test_unknown_group_option_lists_choices(tmp_path):
    result = run_cli("train", "model=unet3", cwd=tmp_path)
    assert result.returncode != 0
    assert "model/unet3" in result.stderr and "unet" in result.stderr
    assert "deeplabv3_resnet50" in result.stderr  # the available options are listed


def test_typo_in_a_config_key_is_reported(tmp_path):
    result = run_cli("train", "trainer.max_iter=3", cwd=tmp_path)
    assert result.returncode != 0
    assert "max_iter" in result.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.pt"))


def test_training_writes_metrics_checkpoints_and_tensorboard(trained_run):
    _, run_dir, _ = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["semantic"]["mIoU"] <= 100.0
    assert set(metrics["semantic"]["per_class"]) == {
        "background", *load_checkpoint(run_dir / "checkpoints/last.pt")["meta"]["classes"][1:]}
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["trainer"]["step"] == 6 and "model" in ckpt and "optimizer" in ckpt
    assert ckpt["version"] and "unet" in ckpt["config"].lower()
    assert (run_dir / "checkpoints" / "best.pt").exists()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))


def test_eval_from_the_checkpoint_reproduces_the_final_metrics(trained_run):
    work, run_dir, _ = trained_run
    out = work / "eval.json"
    result = run_cli("eval", f"ckpt={run_dir}/checkpoints/last.pt", f"output={out}", cwd=work)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == json.loads((run_dir / "metrics.json").read_text())
    assert "mIoU" in result.stdout


def test_eval_of_a_checkpoint_with_another_class_count_is_a_clear_error(trained_run):
    work, run_dir, _ = trained_run
    result = run_cli("eval", f"ckpt={run_dir}/checkpoints/last.pt", "dataset.num_classes=4",
                     cwd=work)
    assert result.returncode == 1
    assert "does not fit the configured model" in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_refuses_a_checkpoint_that_names_foreign_code(trained_run, tmp_path):
    _, run_dir, _ = trained_run
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    ckpt["config"] = ckpt["config"].replace("segtrain.models.unet.build_unet", "os.system")
    save_checkpoint(ckpt, tmp_path / "evil.pt")
    result = run_cli("eval", f"ckpt={tmp_path / 'evil.pt'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "os.system" in result.stderr and "refusing" in result.stderr


def test_eval_of_a_missing_checkpoint_names_the_path(tmp_path):
    result = run_cli("eval", "ckpt=nowhere/last.pt", cwd=tmp_path)
    assert result.returncode == 1
    assert "nowhere/last.pt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("make_root", [False, True], ids=["missing", "empty"])
def test_a_missing_or_empty_dataset_root_names_the_path_and_layout(tmp_path, make_root):
    root = tmp_path / "coco"
    if make_root:
        root.mkdir()
    result = run_cli("train", "dataset=coco", f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'r'}",
                     cwd=tmp_path)
    assert result.returncode == 1
    assert str(root) in result.stderr and "instances_train2017.json" in result.stderr
    assert "Traceback" not in result.stderr and "Error in call to target" not in result.stderr


def test_a_fresh_run_never_overwrites_an_earlier_checkpoint(trained_run):
    work, run_dir, _ = trained_run
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    result = _train(run_dir, cwd=work)
    assert result.returncode == 1
    assert "already holds a checkpoint" in result.stderr and "resume=true" in result.stderr
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before


def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path):
    settings = [*TINY, "trainer.max_iters=40", "trainer.eval_every=0", "trainer.ckpt_every=0",
                "trainer.log_every=1", "trainer.deterministic=true"]
    reference = run_cli("train", *settings, f"hydra.run.dir={tmp_path / 'ref'}", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "segtrain", "train", *settings, "data.num_workers=1",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    for line in process.stdout:  # wait until training is under way
        if "iter 3/40" in line:
            # As a scheduler does: the whole process group, loader worker included.
            os.killpg(process.pid, signal.SIGTERM)
            break
    output = process.stdout.read()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, output
    assert "Resume with: segtrain train resume=true" in output
    step = load_checkpoint(run_dir / "checkpoints" / "last.pt")["trainer"]["step"]
    assert 3 <= step < 40

    resumed = run_cli("train", *settings, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    final = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    expected = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")
    assert final["trainer"]["step"] == 40
    for name, tensor in expected["model"].items():
        assert torch.equal(final["model"][name], tensor), name


def test_bf16_autocast_channels_last_run_on_cpu(tmp_path):
    result = _train(tmp_path / "bf16", "trainer.precision=bf16", "trainer.channels_last=true",
                    "trainer.max_iters=2", "trainer.eval_every=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert 0.0 <= metrics["semantic"]["aAcc"] <= 100.0


def test_installed_configs_resolve_outside_the_checkout(tmp_path):
    result = run_cli("train", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "segtrain.models.unet.build_unet" in result.stdout
    assert str(ROOT) not in result.stdout


def _write_label_dirs(root, count=4):
    """GT label PNGs from the synthetic set, and predictions with circles called rectangles."""
    from PIL import Image

    from segtrain.data.datasets.synthetic import SyntheticDataset

    data = SyntheticDataset(split="val", num_samples=count, image_size=48, num_classes=4)
    (root / "gt").mkdir()
    (root / "pred").mkdir()
    pairs = []
    for i in range(count):
        truth = data[i][1]["semantic"].as_subclass(torch.Tensor)
        pred = torch.where(truth == 1, 2, truth).clamp(max=3) if i % 2 else truth.clamp(max=3)
        Image.fromarray(truth.to(torch.uint8).numpy()).save(root / "gt" / f"{i:03d}.png")
        Image.fromarray(pred.to(torch.uint8).numpy()).save(root / "pred" / f"{i:03d}.png")
        pairs.append((pred, truth))
    return pairs


def test_score_semantic_matches_the_evaluator_and_writes_metrics(tmp_path):
    from segtrain.metrics.report import write_metrics_json
    from segtrain.metrics.semantic import SemanticEvaluator

    pairs = _write_label_dirs(tmp_path)
    evaluator = SemanticEvaluator(4, 255)
    for pred, truth in pairs:
        evaluator.update(pred, truth)
    write_metrics_json(evaluator.compute(), tmp_path / "expected.json")
    out = tmp_path / "m.json"
    result = run_cli("score", "task=semantic", f"gt={tmp_path / 'gt'}", f"pred={tmp_path / 'pred'}",
                     "num_classes=4", f"output={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == json.loads((tmp_path / "expected.json").read_text())
    assert "mIoU" in result.stdout


def test_score_with_missing_predictions_names_the_files(tmp_path):
    _write_label_dirs(tmp_path)
    (tmp_path / "pred" / "002.png").unlink()
    result = run_cli("score", "task=semantic", f"gt={tmp_path / 'gt'}", f"pred={tmp_path / 'pred'}",
                     "num_classes=4", f"output={tmp_path / 'm.json'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "1 of 4" in result.stderr and "002" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m.json").exists()


def test_score_of_an_unknown_task_lists_the_valid_ones(tmp_path):
    result = run_cli("score", "task=semantc", "gt=a", "pred=b", cwd=tmp_path)
    assert result.returncode != 0
    assert "task/semantc" in result.stderr and "semantic" in result.stderr


def _write_coco_case(root, seed=0):
    from test_metrics_coco import make_case

    gt, results = make_case(seed, num_images=5)
    (root / "instances.json").write_text(json.dumps(gt))
    (root / "results.json").write_text(json.dumps(results))
    return gt, results


@pytest.mark.parametrize("area_from", ["bbox", "mask"])
def test_score_instance_writes_cocoeval_numbers(tmp_path, area_from):
    from test_metrics_coco import STAT_NAMES, reference_coco

    gt, results = _write_coco_case(tmp_path)
    out = tmp_path / "m.json"
    result = run_cli("score", "task=instance", f"gt={tmp_path / 'instances.json'}",
                     f"pred={tmp_path / 'results.json'}", f"area_from={area_from}", f"output={out}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    for iou_type in ("segm", "bbox"):
        drop_bbox = area_from == "mask" and iou_type == "segm"
        stats = reference_coco(gt, results, iou_type, drop_bbox=drop_bbox).stats
        for name, value in zip(STAT_NAMES, stats):
            got = metrics[iou_type][name]
            assert (got is None) if value < 0 else got == pytest.approx(value * 100, abs=1e-6), name
    assert "segm AP" in result.stdout and "cat10" in result.stdout and "AR100" in result.stdout


def test_score_instance_never_imports_torch(tmp_path):
    _write_coco_case(tmp_path)
    assert not score_loads_torch(["task=instance", f"gt={tmp_path / 'instances.json'}",
                                  f"pred={tmp_path / 'results.json'}", f"output={tmp_path / 'm.json'}",
                                  f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert (tmp_path / "m.json").exists()


def test_score_lvis_writes_the_lvis_numbers(tmp_path):
    from test_metrics_lvis import make_lvis_case

    from segtrain.metrics.lvis import score_lvis
    from segtrain.metrics.report import write_metrics_json

    gt, results = make_lvis_case(0, num_images=5)
    (tmp_path / "lvis.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    expected = score_lvis(tmp_path / "lvis.json", tmp_path / "results.json")
    write_metrics_json(expected, tmp_path / "expected.json")
    out = tmp_path / "m.json"
    result = run_cli("score", "task=lvis", f"gt={tmp_path / 'lvis.json'}",
                     f"pred={tmp_path / 'results.json'}", "iou_types=segm", f"output={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = json.loads((tmp_path / "expected.json").read_text())
    assert json.loads(out.read_text()) == {"segm": expected["segm"]}
    assert "APr" in result.stdout


def test_score_instance_with_an_unknown_image_names_the_entry(tmp_path):
    _, results = _write_coco_case(tmp_path)
    results[4]["image_id"] = 31337
    (tmp_path / "results.json").write_text(json.dumps(results))
    result = run_cli("score", "task=instance", f"gt={tmp_path / 'instances.json'}",
                     f"pred={tmp_path / 'results.json'}", f"output={tmp_path / 'm.json'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "entry 4 (image_id=31337" in result.stderr and "results.json" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "m.json").exists()


INSTANCE_TINY = [
    "model=maskrcnn_small", "dataset=synthetic_instance", "dataset.train.num_samples=8",
    "dataset.val.num_samples=4", "dataset.train.image_size=64", "dataset.val.image_size=64",
    "model.min_size=64", "model.max_size=64", "data.batch_size=2", "data.num_workers=0",
    "trainer.max_iters=2", "trainer.eval_every=2", "trainer.device=cpu", "trainer.vis_images=1",
]


def test_instance_train_then_eval_reproduces_mask_ap_and_writes_results(tmp_path):
    run_dir = tmp_path / "mrcnn"
    trained = run_cli("train", *INSTANCE_TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"segm", "bbox"} <= metrics.keys() and "AP" in metrics["segm"]
    results = json.loads((run_dir / "coco_instances_results.json").read_text())
    assert all({"image_id", "category_id", "segmentation", "score"} <= r.keys() for r in results)
    assert (run_dir / "checkpoints" / "best.pt").exists()  # best_metric=auto → segm/AP

    evaluated = run_cli("eval", f"ckpt={run_dir / 'checkpoints' / 'last.pt'}",
                        f"output={tmp_path / 'eval'}", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again == metrics
    assert (tmp_path / "eval" / "coco_instances_results.json").exists()


PANOPTIC_TINY = [
    "experiment=synthetic_panoptic_fpn", "dataset.train.num_samples=8", "dataset.val.num_samples=4",
    "model.min_size=64", "model.max_size=64", "data.batch_size=2", "data.num_workers=0",
    "trainer.max_iters=2", "trainer.eval_every=2", "trainer.device=cpu", "trainer.vis_images=1",
    "task.instance_score_thresh=0.0", "task.stuff_area_thresh=1",
]


def test_panoptic_train_then_eval_reproduces_pq_and_writes_coco_panoptic(tmp_path):
    run_dir = tmp_path / "pfpn"
    trained = run_cli("train", *PANOPTIC_TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"panoptic", "segm", "bbox", "semantic"}  # PQ, AP and mIoU in one pass
    assert {"PQ", "PQ_th", "PQ_st", "per_class"} <= metrics["panoptic"].keys()
    assert "mIoU" in metrics["semantic"] and "AP" in metrics["segm"]
    assert (run_dir / "coco_instances_results.json").is_file()
    predictions = json.loads((run_dir / "panoptic_predictions.json").read_text())
    assert len(predictions["annotations"]) == 4
    for ann in predictions["annotations"]:
        assert (run_dir / "panoptic_predictions" / ann["file_name"]).is_file()
    assert (run_dir / "checkpoints" / "best.pt").exists()  # best_metric=auto -> panoptic/PQ

    evaluated = run_cli("eval", f"ckpt={run_dir / 'checkpoints' / 'last.pt'}",
                        f"output={tmp_path / 'eval'}", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics
    assert (tmp_path / "eval" / "panoptic_predictions.json").exists()


def test_score_typo_is_named_and_the_run_directory_keeps_the_config(tmp_path):
    _write_coco_case(tmp_path)
    args = ["score", "task=instance", f"gt={tmp_path / 'instances.json'}",
            f"pred={tmp_path / 'results.json'}"]
    typo = run_cli(*args, "iou_type=segm", cwd=tmp_path)
    assert typo.returncode == 1 and "iou_type" in typo.stderr and "not in struct" in typo.stderr
    assert not (tmp_path / "outputs").exists()
    scored = run_cli(*args, cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    (run_dir,) = (tmp_path / "outputs" / "score").glob("*/*")
    assert json.loads((run_dir / "metrics.json").read_text())["segm"]["AP"] >= 0
    assert f"gt: {tmp_path / 'instances.json'}" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert (run_dir / ".hydra" / "overrides.yaml").read_text().splitlines()[0] == "- task=instance"
