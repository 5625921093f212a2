"""`loss=` is never silently ignored: a model family that computes its own losses refuses it."""

from __future__ import annotations

from conftest import run_cli


def test_maskrcnn_with_a_loss_override_is_an_error_naming_its_own_losses(tmp_path):
    for override in ("loss=dice", "loss.ignore_index=3"):
        run = run_cli("train", "model=maskrcnn_small", "dataset=synthetic_instance", override,
                      "trainer.max_iters=2", "data.num_workers=0", f"hydra.run.dir={tmp_path / 'run'}",
                      cwd=tmp_path, timeout=120)
        assert run.returncode == 1, run.stderr
        assert f"{override}: model=maskrcnn_small computes its own losses" in run.stderr
        assert "loss_classifier" in run.stderr and "task.loss_weights" in run.stderr
        checkpoints = tmp_path / "run" / "checkpoints"
        assert not checkpoints.exists() or not any(checkpoints.iterdir())
