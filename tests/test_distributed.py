"""Distributed data parallel on CPU (gloo): eval sharding, evaluator reduction, training, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY, run_cli
from test_trainer import ToyTask
from torch import nn

from segtrain.data.loader import ShardSampler, build_eval_loader, build_train_loader
from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.engine.trainer import Trainer, TrainerConfig, TrainingInterrupted
from segtrain.metrics.base import Evaluator
from segtrain.utils.checkpoint import load_checkpoint

# ------------------------------------------------------------------------------ eval sharding


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 7, 10])
def test_eval_shards_hold_every_index_exactly_once_in_order(size, world):
    shards = [list(ShardSampler(size, rank, world)) for rank in range(world)]
    assert [i for shard in shards for i in shard] == list(range(size))  # no padding, no gap
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(ShardSampler(size, rank, world)) for rank in range(world)] == list(map(len, shards))


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        ShardSampler(5, 2, 2)


# ------------------------------------------------- evaluators: distributed == single process
META_THINGS = DatasetMeta(["background", "a", "b", "c"], default_palette(4), thing_ids=[1, 2, 3],
                          category_ids=[0, 11, 12, 13])
META_PANOPTIC = DatasetMeta(["a", "b", "sky", "road"], default_palette(4), thing_ids=[0, 1],
                            stuff_ids=[2, 3], category_ids=[1, 2, 20, 21])
TIMEOUT = timedelta(seconds=90)  # a rank left waiting in a collective fails instead of hanging
NUM_IMAGES = 7  # odd: the two ranks' shares differ in size


def _rect(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    y0, x0 = int(rng.integers(0, h - 6)), int(rng.integers(0, w - 6))
    return y0, x0, int(rng.integers(y0 + 3, h)), int(rng.integers(x0 + 3, w))


def _semantic_samples() -> list[tuple[dict, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(NUM_IMAGES):
        gt = torch.randint(0, 4, (12, 10), generator=g)
        gt[torch.rand(12, 10, generator=g) < 0.1] = 255
        noise = torch.randint(0, 4, (12, 10), generator=g)
        pred = torch.where(torch.rand(12, 10, generator=g) < 0.6, gt.clamp(max=3), noise)
        samples.append(({"semantic": gt}, pred))
    return samples


def _masks(rects: list, h: int, w: int) -> torch.Tensor:
    out = torch.zeros(len(rects), h, w, dtype=torch.bool)
    for k, (y0, x0, y1, x1) in enumerate(rects):
        out[k, max(y0, 0):y1, max(x0, 0):x1] = True
    return out


def _xyxy(rects: list) -> torch.Tensor:
    return torch.tensor([[max(x0, 0), max(y0, 0), x1, y1] for y0, x0, y1, x1 in rects],
                        dtype=torch.float32).reshape(-1, 4)


def _instance_samples() -> list[tuple[dict, dict]]:
    """Rectangles with crowds, images without ground truth, scores rounded to make ties."""
    rng = np.random.default_rng(0)
    samples = []
    for index in range(NUM_IMAGES):
        h, w = 24, 32
        boxes, labels = [], []
        for _ in range(0 if index == 2 else int(rng.integers(1, 4))):
            boxes.append(_rect(rng, h, w))
            labels.append(int(rng.integers(1, 4)))
        detections = [(y0 + int(rng.integers(-1, 2)), x0, y1, x1 + int(rng.integers(-1, 2)))
                      for y0, x0, y1, x1 in boxes]
        detections += [_rect(rng, h, w) for _ in range(int(rng.integers(0, 3)))]
        false_labels = [int(rng.integers(1, 4)) for _ in detections[len(boxes):]]
        target = {"image_id": 100 + index, "orig_size": torch.tensor([h, w]),
                  "masks": _masks(boxes, h, w), "boxes": _xyxy(boxes),
                  "labels": torch.tensor(labels, dtype=torch.int64),
                  "iscrowd": torch.tensor([int(rng.random() < 0.15) for _ in boxes], dtype=torch.int64)}
        prediction = {"masks": _masks(detections, h, w), "boxes": _xyxy(detections),
                      "labels": torch.tensor(labels + false_labels, dtype=torch.int64),
                      "scores": torch.tensor([round(float(rng.random()), 1) for _ in detections])}
        samples.append(({"targets": [target]}, [{"instances": prediction}]))
    return samples


def _panoptic_image(rng: np.random.Generator, h: int, w: int, crowd_ok: bool) -> tuple[torch.Tensor, dict]:
    ids = np.zeros((h, w), dtype=np.int64)
    ids[:, : w // 2], ids[:, w // 2:] = 1, 2  # two stuff regions, then things painted over them
    classes = {1: 2, 2: 3}
    for k in range(int(rng.integers(1, 4))):
        y0, x0, y1, x1 = _rect(rng, h, w)
        ids[y0:y1, x0:x1] = 10 + k
        classes[10 + k] = int(rng.integers(0, 2))
    ids[rng.random((h, w)) < 0.03] = 0  # VOID
    present = [int(i) for i in np.unique(ids) if i]
    crowd = [int(crowd_ok and i >= 10 and rng.random() < 0.2) for i in present]
    segments = {"ids": torch.tensor(present), "classes": torch.tensor([classes[i] for i in present]),
                "iscrowd": torch.tensor(crowd)}
    return torch.from_numpy(ids), segments


def _panoptic_samples() -> list[tuple[dict, list[dict]]]:
    rng = np.random.default_rng(1)
    samples = []
    for index in range(NUM_IMAGES):
        gt_ids, gt_segments = _panoptic_image(rng, 20, 24, crowd_ok=True)
        pred_ids, pred_segments = _panoptic_image(rng, 20, 24, crowd_ok=False)
        target = {"image_id": index + 1, "panoptic": gt_ids, "segments": gt_segments}
        prediction = {"panoptic": pred_ids.int(), "segments": [
            {"id": int(i), "category_id": int(c), "isthing": False, "score": 1.0}
            for i, c in zip(pred_segments["ids"], pred_segments["classes"])]}
        samples.append(({"targets": [target]}, [prediction]))
    return samples


def _build_evaluator(kind: str, out: Path) -> tuple[Evaluator, list]:
    if kind == "semantic":
        from segtrain.metrics.semantic import SemanticEvaluator

        return SemanticEvaluator(4), _semantic_samples()
    if kind == "coco":
        from segtrain.metrics.coco import COCOEvaluator

        results_path = out / "coco_instances_results.json"
        return COCOEvaluator(META_THINGS, results_path=results_path), _instance_samples()
    from segtrain.metrics.panoptic import PanopticEvaluator

    return PanopticEvaluator(META_PANOPTIC, output_dir=out), _panoptic_samples()


def _collate(items: list) -> tuple[dict, object]:
    """One (targets, predictions) pair from samples of one image each."""
    batches, predictions = zip(*items)
    if isinstance(predictions[0], torch.Tensor):
        return [{"semantic": b["semantic"]} for b in batches], [{"sem_seg": p} for p in predictions]
    return [t for b in batches for t in b["targets"]], [p for group in predictions for p in group]


def _evaluate(kind: str, out: Path) -> tuple[dict, int]:
    """Evaluate through build_eval_loader (under a process group, this rank's share only);
    returns the metrics and the number of images this process predicted."""
    evaluator, samples = _build_evaluator(kind, out)
    seen = 0
    for targets, predictions in build_eval_loader(samples, 2, _collate):
        evaluator.process(targets, predictions)
        seen += len(predictions)
    return evaluator.compute(), seen


def _evaluator_worker(rank: int, world: int, tmp: str, kind: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init_{kind}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        metrics, seen = _evaluate(kind, Path(tmp) / f"{kind}_ddp")
        (Path(tmp) / f"{kind}_rank{rank}.json").write_text(json.dumps([metrics, seen]))
    finally:
        dist.destroy_process_group()


def _same(a, b, rel: float = 0.0) -> bool:
    """Equality of nested metrics within `rel`, NaN equal to NaN."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rel) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b or abs(a - b) <= rel * abs(b)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["semantic", "coco", "panoptic"])
def test_distributed_evaluation_equals_one_process_exactly(tmp_path, kind):
    single, seen = _evaluate(kind, tmp_path / f"{kind}_single")
    single = json.loads(json.dumps(single))  # through JSON, as the workers' metrics
    assert seen == NUM_IMAGES
    mp.spawn(_evaluator_worker, args=(2, str(tmp_path), kind), nprocs=2, join=True)
    (rank0, seen0), (rank1, seen1) = (json.loads((tmp_path / f"{kind}_rank{r}.json").read_text())
                                      for r in (0, 1))
    assert (seen0, seen1) == (3, 4)  # each image predicted on one rank only
    # Counts (confusion matrix) and gathered detections in the single-process order are bit-exact;
    # PQ sums float64 IoUs, whose two per-rank partial sums add up in another order (~1e-16).
    assert _same(rank0, single, rel=1e-12 if kind == "panoptic" else 0.0)
    assert _same(rank1, rank0)
    family = {"semantic": "semantic", "coco": "segm", "panoptic": "panoptic"}[kind]
    assert 0 < single[family]["mIoU" if kind == "semantic" else "AP" if kind == "coco" else "PQ"] < 100
    if kind == "coco":  # rank 0 wrote every rank's detections, in the single-process order
        name = "coco_instances_results.json"
        assert (tmp_path / "coco_ddp" / name).read_text() == (tmp_path / "coco_single" / name).read_text()
    if kind == "panoptic":  # each rank wrote its images' PNGs; rank 0 the JSON listing all of them
        name = "panoptic_predictions.json"
        ddp, one = tmp_path / "panoptic_ddp", tmp_path / "panoptic_single"
        assert json.loads((ddp / name).read_text()) == json.loads((one / name).read_text())
        pngs = sorted(p.name for p in (ddp / "panoptic_predictions").iterdir())
        assert pngs == sorted(p.name for p in (one / "panoptic_predictions").iterdir())
        assert len(pngs) == NUM_IMAGES


# ------------------------------------------------- resume and stop signals under DDP (in-process)
class Points(torch.utils.data.Dataset):
    def __init__(self, n: int = 24) -> None:
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i] + 0.1 * torch.randn(4)  # augmentation noise under the sample's own seed
        return x, x.sum(dim=0, keepdim=True)


class SquaredError(Evaluator):
    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self._add_state("sums", torch.zeros(2, dtype=torch.float64))

    def process(self, targets, predictions) -> None:
        self.sums += torch.tensor([float(((predictions - targets) ** 2).sum()), len(predictions)],
                                  dtype=torch.float64)

    def _compute(self, state) -> dict:
        return {"toy": {"mse": float(state["sums"][0] / state["sums"][1])}}


class PointsTask(ToyTask):
    """test_trainer's task with a SIGTERM to this process at step `stop_at`, and its own evaluator."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.stop_at, self.steps = stop_at, 0

    def training_step(self, model, batch):
        self.steps += 1
        if self.steps == self.stop_at:  # only the rank given stop_at receives the signal
            os.kill(os.getpid(), signal.SIGTERM)
        return {"loss": nn.functional.mse_loss(model(batch["x"]), batch["y"])}

    def predict(self, model, batch):
        return model(batch["x"])

    def build_evaluator(self, output_dir=None):
        return SquaredError()

    def visualize(self, batch, predictions, max_images=4):
        return None


def _points_trainer(run_dir: Path, task: PointsTask, grad_accum: int = 1) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = TrainerConfig.from_dict(dict(max_iters=6, eval_every=3, ckpt_every=3, device="cpu", log_every=2,
                                       best_metric="toy/mse", best_mode="min", vis_images=0,
                                       grad_accum=grad_accum))
    data = Points()
    def constant(opt, total):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    train_loader = build_train_loader(data, 2, task.collate, seed=3)
    return Trainer(model, task, optimizer, constant, train_loader, build_eval_loader(data, 5, task.collate),
                   cfg, run_dir, checkpoint_extra={"config": "{}", "meta": {}})


def _resume_worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init_resume", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    tmp_path = Path(tmp)
    try:
        reference = _points_trainer(tmp_path / "ref", PointsTask(), grad_accum=2)
        reference.fit()
        # SIGTERM reaches rank 1 only, during iteration 2: every rank stops after it.
        task = PointsTask(stop_at=3 if rank == 1 else None)
        interrupted = _points_trainer(tmp_path / "run", task, grad_accum=2)
        try:
            interrupted.fit()
            raise AssertionError("the run was not interrupted")
        except TrainingInterrupted as stop:
            assert "iteration 2/6" in str(stop) and stop.exit_code == 128 + signal.SIGTERM
        resumed = _points_trainer(tmp_path / "run", PointsTask(), grad_accum=2)
        resumed.load_state_dict(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt"))
        resumed.fit()
        same = all(torch.equal(p, q) for p, q in zip(reference.model.state_dict().values(),
                                                      resumed.model.state_dict().values()))
        replicas = [None] * world
        dist.all_gather_object(replicas, [p.detach() for p in resumed.model.parameters()])
        in_sync = all(torch.equal(p, q) for p, q in zip(*replicas))
        (tmp_path / f"resume_rank{rank}.json").write_text(json.dumps({
            "same": same, "in_sync": in_sync, "keys": sorted(load_checkpoint(
                tmp_path / "ref" / "checkpoints" / "last.pt")["model"]),
            "step": resumed.state.step, "world_size": resumed.state.world_size}))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_stop_on_one_rank_stops_all_and_resume_under_ddp_repeats_the_uninterrupted_run(tmp_path):
    mp.spawn(_resume_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"resume_rank{rank}.json").read_text())
        assert result["same"] and result["in_sync"]
        assert result["step"] == 6 and result["world_size"] == 2
        assert result["keys"] and not any(k.startswith("module.") for k in result["keys"])
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["trainer"]["step"] == 6


def test_ddp_trainer_options_must_be_booleans():
    with pytest.raises(ValueError, match="sync_bn"):
        TrainerConfig.from_dict({"sync_bn": "yes"})


# ---------------------------------------------------------------- torchrun end to end (CLI)
def _tiny(batch_size: int) -> list[str]:
    # GroupNorm (per sample) so that 2 ranks x 2 images compute what 1 process x 4 images does;
    # SGD, whose step is proportional to the gradient (Adam's m / sqrt(v) turns rounding noise in
    # near-zero gradients into steps of up to lr); 7 validation images: shares of 4 and 3.
    return [o for o in TINY if not o.startswith("data.batch_size")] + [
        f"data.batch_size={batch_size}", "model.norm=gn", "optimizer=sgd", "optimizer.lr=0.05",
        "dataset.val.num_samples=7"]


@pytest.mark.slow
def test_torchrun_two_ranks_train_like_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SEGTRAIN_DEBUG", None)
    (tmp_path / "ddp").mkdir()
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "segtrain", "train", *_tiny(2)],
        cwd=tmp_path / "ddp", env=env, capture_output=True, text=True, timeout=240,
    )
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    single = run_cli("train", *_tiny(4), "hydra.run.dir=single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]

    # Both ranks agreed on one timestamped run directory; rank 0 alone wrote into it.
    runs = list((tmp_path / "ddp" / "outputs").glob("*/*"))
    assert len(runs) == 1, runs
    run = runs[0]
    assert [p.relative_to(run) for p in run.rglob("metrics.json")] == [Path("metrics.json")]
    assert [p.relative_to(run) for p in run.rglob("*.log")] == [Path("train.log")]
    assert len(list(run.rglob("config.yaml"))) == 1
    log_lines = (run / "train.log").read_text().splitlines()
    assert len(log_lines) == len(set(log_lines)) and "2 ranks, global batch 4" in "\n".join(log_lines)

    ckpt, reference = load_checkpoint(run / "checkpoints" / "last.pt"), load_checkpoint(
        tmp_path / "single" / "checkpoints" / "last.pt")
    assert ckpt["model"].keys() == reference["model"].keys()
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["trainer"]["world_size"] == 2
    # Same samples per step, same per-sample math; only the float32 summation order differs (two
    # half-batch means averaged by the all-reduce vs one mean of four): rounding, ~1e-7 relative
    # per step (measured: max |diff| 1.7e-7 after 6 steps). Training on each rank's half alone,
    # or a sum instead of a mean, would differ by the size of the updates (~1e-2).
    for name, value in reference["model"].items():
        torch.testing.assert_close(ckpt["model"][name], value, rtol=1e-5, atol=2e-6, msg=name)
    # Metrics: a pixel changes class only if its top two logits lie within that rounding; one
    # pixel of 7 x 64 x 64 moves aAcc by 0.0035 points.
    metrics = json.loads((run / "metrics.json").read_text())["semantic"]
    expected = json.loads((tmp_path / "single" / "metrics.json").read_text())["semantic"]
    for key in ("mIoU", "aAcc", "mAcc", "fwIoU"):
        assert metrics[key] == pytest.approx(expected[key], abs=0.02), key

    # `segtrain eval` under torchrun: each rank its share of the 7 images, one metrics.json,
    # equal to the training's final evaluation of the same weights.
    evaluated = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "segtrain", "eval", f"ckpt={run / 'checkpoints' / 'last.pt'}"],
        cwd=tmp_path / "ddp", env=env, capture_output=True, text=True, timeout=240,
    )
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    eval_runs = list((tmp_path / "ddp" / "outputs" / "eval").glob("*/*"))
    assert len(eval_runs) == 1 and len(list(eval_runs[0].rglob("*.json"))) == 1
    assert json.loads((eval_runs[0] / "metrics.json").read_text())["semantic"] == metrics


# ------------------------------------------------------------- run directory agreed by ranks
def test_ranks_resolve_the_run_directory_at_rank_0s_clock_and_only_rank_0_writes_hydra_files(
    monkeypatch,
):
    from datetime import datetime

    from segtrain import cli
    from segtrain.utils import distributed

    rank0_clock = datetime(2020, 1, 2, 3, 4, 5)
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj, src=0: rank0_clock)
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "get_rank", lambda rank=rank: rank)
        train = cli._rank_overrides("train", ["trainer.max_iters=3", "-m"])
        assert train[:2] == ["hydra.run.dir='outputs/2020-01-02/03-04-05'",
                             "hydra.sweep.dir='multirun/2020-01-02/03-04-05'"]
        writes_nothing = ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]",
                          "~hydra.job_logging.handlers.file", "hydra.job_logging.root.level=WARNING"]
        assert train[2:] == ([] if rank == 0 else writes_nothing)
    # eval's own pattern; a directory the user chose is left alone
    assert cli._rank_overrides("eval", ["ckpt=x.pt", "hydra.run.dir=mine"])[:1] == [
        "hydra.sweep.dir='multirun/2020-01-02/03-04-05'"]
    assert cli._rank_overrides("eval", ["ckpt=x.pt"])[0] == "hydra.run.dir='outputs/eval/2020-01-02/03-04-05'"


def _join_worker(rank: int, world: int, tmp: str, port: int) -> None:
    """A task as submitit starts it: rank variables in the environment, Hydra's file log handler."""
    import logging

    from segtrain.utils.distributed import get_rank, get_world_size, join_launched_group

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(logging.FileHandler(Path(tmp) / f"rank{rank}.log"))
    join_launched_group()
    join_launched_group()  # a second call (eval after train, cli.main having joined) is a no-op
    logging.getLogger("segtrain.train").info("info from rank %d", rank)
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    (Path(tmp) / f"joined{rank}.json").write_text(json.dumps(
        [get_rank(), get_world_size(), len(files), root.level]))
    for handler in files:
        handler.close()


@pytest.mark.timeout(120)
def test_a_task_started_without_torchrun_joins_from_its_environment(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_join_worker, args=(2, str(tmp_path), port), nprocs=2, join=True)
    joined = [json.loads((tmp_path / f"joined{r}.json").read_text()) for r in (0, 1)]
    assert joined[0] == [0, 2, 1, 20]  # rank 0 keeps its log file and INFO level
    assert joined[1] == [1, 2, 0, 30]  # rank 1: console only, warnings only
    assert "info from rank 0" in (tmp_path / "rank0.log").read_text()
    assert (tmp_path / "rank1.log").read_text() == ""
