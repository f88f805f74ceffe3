"""End to end: the real `orchestrate` command, real Ray, 2 gloo DDP workers, checked in MLflow.

All but the README-demo test share one Ray head (the `ray_head` fixture), so Ray starts once
per session; the demo test runs exactly as a new user would, on an embedded Ray.
"""

from __future__ import annotations

from collections import Counter

import mlflow
import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import (
    run_cli,
    runs_of,
    start_cli,
    terminate,
    tracking_uri,
)

pytestmark = pytest.mark.slow


def assert_each_step_once(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    """Every metric key: each step appears exactly once. Returns the steps per key."""
    steps = {}
    for key in client.get_run(run_id).data.metrics:
        history = [m.step for m in client.get_metric_history(run_id, key)]
        dupes = [s for s, n in Counter(history).items() if n > 1]
        assert not dupes, f"{key}: steps logged more than once: {dupes}"
        steps[key] = sorted(history)
    return steps


def heldout_accuracy(store: str, model_uri: str, job_name: str) -> float:
    from orchestrator.job import job_config, load_job

    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    job = load_job(job_name)
    splits = job.build_data(job_config(job, {"name": job_name}))
    x, y = splits.val[:]
    # pyfunc: the interface batch inference uses; the model was logged in eval mode.
    logits = mlflow.pyfunc.load_model(model_uri).predict(x.numpy())
    return float((logits.argmax(1) == y.numpy()).mean())


def test_readme_demo_cnn_digits_embedded(tmp_path, ray_head):
    """The README's demo command on an embedded Ray, plus registration, checked via MlflowClient.

    The session's `ray start` head is running meanwhile: the embedded Ray must start its own
    instance rather than attach to it."""
    proc = start_cli(
        ["job=cnn_digits", "trainer.num_workers=2", "tracking.register_as=digits_cnn"], tmp_path
    )
    try:
        output, _ = proc.communicate(timeout=900)
    finally:
        terminate(proc)
    assert proc.returncode == 0, output
    (run,) = runs_of(tmp_path)
    run_id = run.info.run_id
    assert f"MLflow run id: {run_id}" in output
    assert f"mlflow ui --backend-store-uri {tracking_uri(tmp_path)}" in output
    assert "epoch  30/30" in output  # live progress reached the user
    assert "RayTrainWorker" not in output  # Ray's chatter did not
    assert run.info.status == "FINISHED"

    client = MlflowClient(tracking_uri(tmp_path))
    steps = assert_each_step_once(client, run_id)
    assert len(steps["val/acc"]) == 30 and len(steps["epoch"]) == 30
    steps_per_epoch = steps["val/acc"][0]
    assert steps["val/acc"] == [steps_per_epoch * e for e in range(1, 31)]
    assert steps["train/loss"] == list(range(10, steps["val/acc"][-1] + 1, 10))
    for key in (
        "train/lr",
        "train/samples_per_s",
        "train/epoch_time_s",
        "val/loss",
        "startup/time_to_first_step_s",
    ):
        assert key in steps
    # Where the start-up went, in order (seconds since `orchestrate` started).
    phases = [run.data.metrics[f"startup/{p}_s"] for p in ("fit_called", "worker_entered",
              "job_loaded", "data_built", "model_built", "references_done", "time_to_first_step")]  # fmt: skip
    assert phases == sorted(phases) and phases[0] > 0
    assert run.data.tags["workers.num_nodes"] == "1"
    # CPU workers: gloo (a GPU run says nccl and names its card, benchmarks/gpu.py checks it).
    assert run.data.tags["workers.device"] == "cpu"
    assert run.data.tags["workers.backend"] == "gloo"
    assert run.data.params["trainer.num_workers"] == "2"
    assert run.data.params["job.name"] == "cnn_digits"
    assert run.data.tags["job"] == "cnn_digits"
    assert "trainer.num_workers=2" in run.data.tags["orchestrator.overrides"]
    # The description says how to reproduce the run: the exact command and the commit.
    description = run.data.tags["mlflow.note.content"]
    assert "orchestrate job=cnn_digits trainer.num_workers=2" in description
    assert run.data.tags["mlflow.source.git.commit"] in description
    assert run.info.run_name.startswith("cnn_digits")  # readable, not random words
    assert "config.yaml" in [a.path for a in client.list_artifacts(run_id)]
    assert [a.path for a in client.list_artifacts(run_id, "confusion_matrix")] == [
        "confusion_matrix/epoch_030.png"
    ]
    assert run.data.metrics["baseline/svm_rbf_acc"] == pytest.approx(0.9833, abs=1e-4)

    reported = run.data.metrics["val/acc"]
    assert reported >= 0.985, f"cnn_digits held-out accuracy {reported} below the 0.985 bar"
    assert heldout_accuracy(
        tracking_uri(tmp_path), "models:/digits_cnn@champion", "cnn_digits"
    ) == pytest.approx(reported, abs=1e-9)
    # The embedded cluster and its workers are gone when the command returns. Ray names the
    # cluster's session directory after the driver's pid; no process of that session is left.
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if f"_{proc.pid}/" in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []


def test_mlp_tabular_default_is_accurate_and_deterministic(tmp_path, ray_head):
    args = ["job=mlp_tabular", f"cluster.address={ray_head}", "tracking.log_model=false"]
    first = run_cli(args, tmp_path)
    second = run_cli(args, tmp_path)
    assert first.returncode == 0 and second.returncode == 0, first.stdout + first.stderr
    a, b = runs_of(tmp_path)
    assert a.data.metrics["val/acc"] >= 0.97
    for key in ("val/acc", "val/loss", "train/loss_epoch"):
        assert a.data.metrics[key] == b.data.metrics[key], key


@pytest.mark.fault
def test_nonfinite_loss_marks_run_failed_without_retry(tmp_path, ray_head):
    out = run_cli(
        [
            "job=mlp_tabular",
            "optim=sgd",
            "optim.lr=1e12",
            "trainer.max_failures=2",
            f"cluster.address={ray_head}",
        ],
        tmp_path,
    )
    assert out.returncode == 1
    assert "non-finite loss" in out.stderr and "optim.lr" in out.stderr
    (run,) = runs_of(tmp_path)
    assert run.info.status == "FAILED"
    assert "non-finite" in run.data.tags["error"]
    assert "epoch" not in run.data.metrics  # stopped in the first epoch; not retried


def test_a_value_only_build_data_rejects_fails_the_run_with_the_jobs_own_message(
    tmp_path, ray_head
):
    """The data is built by a Ray actor beside the driver (shared_data.py), not in the workers:
    a job's own ValueError must still reach the user as itself, not as Ray's task wrapper."""
    out = run_cli(
        ["job=ssm_selective_copy", "job.num_tokens=999", f"cluster.address={ray_head}"], tmp_path
    )
    assert out.returncode == 1, out.stdout + out.stderr
    cause = "job.num_tokens must be in [1, job.seq_len], got 999"
    assert "training failed" in out.stderr and cause in out.stderr, out.stderr
    (run,) = runs_of(tmp_path)
    assert run.info.status == "FAILED" and cause in run.data.tags["error"]


# Worker and driver kills, SIGTERM and resume: tests/test_faults.py.
