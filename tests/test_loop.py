"""The training loop in one process (no Ray, no tracking): the loop's own guarantees."""

from __future__ import annotations

import pytest
import torch

from orchestrator.checkpoint import CorruptCheckpoint, load, save
from orchestrator.cli import compose_config
from orchestrator.context import LocalContext
from orchestrator.loop import run

FAST = ["job=mlp_tabular", "trainer.max_epochs=4", "trainer.log_every_n_steps=5"]


def train(overrides: list[str], **ctx_kwargs):
    return run(compose_config(FAST + overrides), LocalContext(**ctx_kwargs))


def test_same_seed_same_metrics_and_different_seed_differs():
    a, b = train(["seed=1"]), train(["seed=1"])
    c = train(["seed=2"])
    assert a.status == b.status == "finished"
    keys = ["train/loss_epoch", "val/loss", "val/acc"]
    assert [a.metrics[k] for k in keys] == [b.metrics[k] for k in keys]
    assert a.metrics["val/loss"] != c.metrics["val/loss"]


def test_learns_the_task():
    result = train(["trainer.max_epochs=30"])
    assert result.metrics["val/acc"] > 0.9
    assert result.epoch == 30


def test_gradient_accumulation_matches_a_bigger_batch():
    """accum=2 × batch 8 must take the same optimizer steps as batch 16 (no dropout, no BN)."""
    common = ["job.dropout=0", "trainer.max_epochs=2", "sched=constant"]
    big = train(common + ["trainer.batch_size=16"])
    accumulated = train(common + ["trainer.batch_size=8", "trainer.grad_accum_steps=2"])
    assert big.step == accumulated.step
    # Shuffling differs with the batch size only through the sampler's fixed order, which is
    # the same; so the losses agree up to float summation order.
    assert accumulated.metrics["val/loss"] == pytest.approx(big.metrics["val/loss"], rel=1e-4)


def test_nonfinite_loss_stops_with_a_clear_message():
    result = train(["optim=sgd", "optim.lr=1e12"])
    assert result.status == "nonfinite"
    assert "non-finite" in result.message and "optim.lr" in result.message


def test_grad_clip_and_bf16_autocast_train_finite():
    result = train(["trainer.grad_clip=0.5", "trainer.precision=bf16", "trainer.max_epochs=2"])
    assert result.status == "finished"
    assert torch.isfinite(torch.tensor(result.metrics["val/loss"]))


class _Crash(Exception):
    pass


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    """Crash after epoch 2's checkpoint, rerun: it resumes at epoch 3 and ends identically."""
    reference = train([])

    def crash_after_second_epoch(event):
        if event["type"] == "epoch" and event["epoch"] == 2:
            raise _Crash

    with pytest.raises(_Crash):
        train([], checkpoint_dir=str(tmp_path), on_progress=crash_after_second_epoch)
    epochs_seen = []
    resumed = train(
        [],
        checkpoint_dir=str(tmp_path),
        on_progress=lambda e: e["type"] == "epoch" and epochs_seen.append(e["epoch"]),
    )
    assert epochs_seen == [3, 4]
    for key in ("train/loss_epoch", "val/loss", "val/acc"):
        assert resumed.metrics[key] == pytest.approx(reference.metrics[key], abs=1e-6)


def test_checkpoint_checksum_detects_truncation(tmp_path):
    save({"w": torch.arange(1000.0), "epoch": 1, "global_step": 3}, tmp_path)
    assert load(tmp_path)["epoch"] == 1
    state = tmp_path / "state.pt"
    state.write_bytes(state.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpoint, match="checksum"):
        load(tmp_path)


def test_job_hooks_log_references_and_artifacts_to_mlflow(tmp_path):
    """Single process with a real SQLite MLflow store: baselines at step 0, plots as artifacts."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking

    cfg = compose_config(FAST + ["trainer.max_epochs=2"])
    cfg["tracking"]["uri"] = uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.create_run(uri, "loop-test", "hooks", {}, {}, "")
    run(cfg, LocalContext(), run_id)
    client = MlflowClient(uri)
    (baseline,) = client.get_metric_history(run_id, "baseline/logreg_acc")
    assert baseline.step == 0 and 0.9 < baseline.value <= 1.0
    files = [f.path for f in client.list_artifacts(run_id, "confusion_matrix")]
    assert files == ["confusion_matrix/epoch_002.png"]


def test_step_losses_logged_at_the_epoch_end_keep_their_steps_times_and_average(tmp_path):
    """train/loss is reduced once per epoch, not per step: each value still lands on its own
    step with the time it was taken, and one epoch's values average to train/loss_epoch."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking

    cfg = compose_config(FAST + ["trainer.max_epochs=1", "trainer.log_every_n_steps=1",
                                 "trainer.limit_batches=6"])  # fmt: skip
    cfg["tracking"]["uri"] = uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.create_run(uri, "loop-test", "windows", {}, {}, "")
    result = run(cfg, LocalContext(), run_id)
    history = sorted(
        MlflowClient(uri).get_metric_history(run_id, "train/loss"), key=lambda m: m.step
    )
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert [m.timestamp for m in history] == sorted(m.timestamp for m in history)
    mean = sum(m.value for m in history) / len(history)
    assert mean == pytest.approx(result.metrics["train/loss_epoch"], rel=1e-9)


def test_limit_batches_caps_steps_per_epoch():
    full = train(["trainer.max_epochs=1", "trainer.batch_size=16"])
    limited = train(["trainer.max_epochs=2", "trainer.batch_size=16", "trainer.limit_batches=3"])
    assert full.step == 29  # 455 training rows / 16
    assert limited.step == 6


def test_weight_ema_is_what_evaluation_sees_and_survives_resume(tmp_path):
    """trainer.ema_decay: the logged val metrics are the averaged weights' (not the raw ones'),
    the checkpoint carries the average, and a resumed run continues it exactly."""
    from orchestrator.job import job_config, load_job
    from orchestrator.loop import evaluate
    from orchestrator.runner import deployed_weights

    ema = ["trainer.ema_decay=0.9", "job.dropout=0"]
    plain = train(["job.dropout=0"])
    averaged = train(ema, checkpoint_dir=str(tmp_path / "full"))
    assert averaged.metrics["train/loss_epoch"] == plain.metrics["train/loss_epoch"]  # same path
    assert averaged.metrics["val/loss"] != plain.metrics["val/loss"]  # evaluated differently

    # Rebuild the evaluation from the checkpoint's EMA weights: it gives the logged numbers.
    state = load(tmp_path / "full")
    assert set(state["ema"]) > {"n_averaged"} and state["ema"]["n_averaged"] == averaged.step
    cfg = compose_config(FAST + ema)
    job = load_job("mlp_tabular")
    jcfg = job_config(job, cfg["job"])
    splits = job.build_data(jcfg)
    model = job.build_model(jcfg, splits)
    model.load_state_dict(deployed_weights(state))
    loader = torch.utils.data.DataLoader(splits.val, batch_size=256)
    again = evaluate(
        job, model, loader, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False)
    )
    assert again["val/loss"] == pytest.approx(averaged.metrics["val/loss"], rel=1e-6)

    def crash_after_second_epoch(event):
        if event["type"] == "epoch" and event["epoch"] == 2:
            raise _Crash

    with pytest.raises(_Crash):
        train(ema, checkpoint_dir=str(tmp_path / "resumed"), on_progress=crash_after_second_epoch)
    resumed = train(ema, checkpoint_dir=str(tmp_path / "resumed"))
    assert resumed.metrics["val/loss"] == pytest.approx(averaged.metrics["val/loss"], abs=1e-6)


def test_ema_decay_out_of_range_is_a_clear_error():
    from orchestrator.errors import UserError

    with pytest.raises(UserError, match="trainer.ema_decay"):
        compose_config(["trainer.ema_decay=1.0"])


def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path):
    """Ray keeps a run's last checkpoints side by side; a truncated newest one is skipped, loudly."""
    from orchestrator.checkpoint import RAY_RUN_SNAPSHOT, load_newest_intact

    for epoch in (1, 2, 3):
        save(
            {"w": torch.full((100,), float(epoch)), "epoch": epoch},
            tmp_path / f"checkpoint_{epoch}",
        )
    (tmp_path / RAY_RUN_SNAPSHOT).write_text("{}")
    (tmp_path / "checkpoint_3" / "state.pt").write_bytes(b"truncated")
    (tmp_path / "checkpoint_2" / "meta.json").write_text('{"sha256": "0", "epoch": 2}')
    state, used, problems = load_newest_intact(tmp_path / "checkpoint_3")
    assert used.name == "checkpoint_1" and state["epoch"] == 1  # newest first: 3, 2, then 1
    assert len(problems) == 2 and all("checksum" in p for p in problems)
    (tmp_path / "checkpoint_2" / "meta.json").write_text("{not json")
    with pytest.raises(CorruptCheckpoint, match="unreadable"):
        load(tmp_path / "checkpoint_2")
    intact, where, none = load_newest_intact(tmp_path / "checkpoint_1")
    assert where.name == "checkpoint_1" and none == []
    (tmp_path / "checkpoint_1" / "state.pt").unlink()
    with pytest.raises(CorruptCheckpoint, match="no intact checkpoint"):
        load_newest_intact(tmp_path / "checkpoint_3")


def test_a_corrupt_downloaded_checkpoint_never_falls_back_to_another_runs_download(tmp_path):
    """A checkpoint on cloud storage reaches the loader as Ray's download into the temp directory
    (`checkpoint_tmp_<uuid>`), beside other runs' downloads: none of those is this run's."""
    from orchestrator.checkpoint import load_newest_intact

    save({"epoch": 7}, tmp_path / "checkpoint_tmp_other_run")
    save({"epoch": 2}, tmp_path / "checkpoint_tmp_this_run")
    (tmp_path / "checkpoint_tmp_this_run" / "state.pt").write_bytes(b"truncated")
    with pytest.raises(CorruptCheckpoint, match="no intact checkpoint") as raised:
        load_newest_intact(tmp_path / "checkpoint_tmp_this_run")
    assert "other_run" not in str(raised.value)


@pytest.mark.slow
def test_compile_runs_the_training_steps_through_torch_compile(tmp_path):
    """trainer.compile=true: the training step is captured by TorchDynamo and compiled (the
    real compiler, inductor, here on the CPU); the checkpoint holds the plain module's keys, so
    resuming, evaluation and the logged model do not depend on the setting."""
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = train(["trainer.max_epochs=1", "trainer.compile=true"], checkpoint_dir=str(tmp_path))
    assert compiled.status == "finished"
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    keys = sorted(load(tmp_path)["model"])
    assert keys and not any("_orig_mod" in k for k in keys), keys
    counters.clear()
    plain = train(["trainer.max_epochs=1"])
    assert counters["stats"]["unique_graphs"] == 0  # not vacuous: nothing compiled without it
    # The same training, compiled or not: fused kernels round differently, and over an
    # epoch of steps that moves the loss by ~0.1 %, not more.
    assert compiled.metrics["val/loss"] == pytest.approx(plain.metrics["val/loss"], rel=1e-2)


def test_a_nonfinite_step_stops_the_run_before_its_weights_are_used(tmp_path):
    """Each step's gradient norm is checked one step later (reading it at once would stall a
    GPU's queue every step), yet the run stops before the next update, and no evaluation or
    checkpoint is made from the diverged weights: at an epoch's end the check comes first."""
    diverging = ["optim=sgd", "optim.lr=1e12"]
    mid_epoch = train(diverging, checkpoint_dir=str(tmp_path / "a"))
    assert mid_epoch.status == "nonfinite", mid_epoch.message
    assert "at epoch 1, step 3:" in mid_epoch.message and "optim.lr" in mid_epoch.message
    assert not (tmp_path / "a" / "meta.json").exists()  # never got to an epoch's end
    # One step per epoch: the third step, the first non-finite one, is its epoch's last.
    at_epoch_end = train(
        [*diverging, "trainer.limit_batches=1"], checkpoint_dir=str(tmp_path / "b")
    )
    assert at_epoch_end.status == "nonfinite"
    assert "at epoch 3, step 3:" in at_epoch_end.message, at_epoch_end.message
    assert load(tmp_path / "b")["epoch"] == 2  # epoch 3's weights were not checkpointed
