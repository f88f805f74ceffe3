"""`orchestrate-jobs` against the session's real Ray head (`ray start --head` on loopback),
through its Jobs API: submit and follow to the end, stop mid-run, refuse a bad override
locally. Results are checked in the MLflow store with MlflowClient.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from mlflow.tracking import MlflowClient
from ray.job_submission import JobSubmissionClient

from tests.conftest import BIN, HEAD_DASHBOARD, tracking_uri, wait_for

pytestmark = pytest.mark.slow

JOBS = str(BIN / "orchestrate-jobs")
TINY = ["job=cnn_digits", "trainer.max_epochs=1", "trainer.limit_batches=5"]
PASSWORD = "not-for-logs-7f3a9c"  # a credential the job gets; it must show up nowhere


def jobs_cli(args: list[str], env: dict | None = None, timeout: float = 300):
    return subprocess.run(
        [JOBS, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def dashboard(ray_head) -> str:
    return HEAD_DASHBOARD[0]


@pytest.fixture
def store(tmp_path) -> str:
    """An absolute SQLite store the head (same machine) can write; created here, once, so the
    job and the CLI's run lookup never migrate a fresh file at the same time."""
    uri = tracking_uri(tmp_path)
    MlflowClient(uri).search_experiments()
    return uri


def submission_id(stdout: str) -> str:
    return next(ln.split()[1] for ln in stdout.splitlines() if ln.startswith("Submitted "))


def the_run(store: str, sid: str):
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("orchestrator")
    found = client.search_runs([exp.experiment_id], f"tags.`orchestrator.submission_id` = '{sid}'")
    assert len(found) == 1, found
    return client, found[0]


def assert_secret_nowhere(secret: str, address: str, sid: str, client: MlflowClient, run) -> None:
    """The credential is in none of: the job's logs, its entrypoint, the run's params/tags."""
    jobs = JobSubmissionClient(address)
    assert secret not in jobs.get_job_logs(sid)
    assert secret not in jobs.get_job_info(sid).entrypoint
    assert secret not in repr(run.data.params)
    assert secret not in repr(run.data.tags)
    assert secret not in jobs_cli(["logs", "--address", address, sid]).stdout


def test_submit_follows_logs_to_completion(dashboard, store):
    out = jobs_cli(
        ["submit", "--address", dashboard, "--", *TINY, "trainer.num_workers=2"],
        # The URI and a (here unused) password reach the job only as environment variables.
        env={
            "MLFLOW_TRACKING_URI": store,
            "MLFLOW_TRACKING_USERNAME": "alice",
            "MLFLOW_TRACKING_PASSWORD": PASSWORD,
        },
    )
    assert out.returncode == 0, out.stdout + out.stderr
    sid = submission_id(out.stdout)
    client, run = the_run(store, sid)
    assert f"MLflow run: {run.info.run_id} in {store}" in out.stdout
    assert "epoch   1/1" in out.stdout  # the job's own progress, streamed
    assert out.stdout.rstrip().endswith(f"Job {sid} SUCCEEDED")
    assert run.info.status == "FINISHED"
    assert {"val/acc", "val/loss", "train/loss_epoch"} <= set(run.data.metrics)
    assert run.data.params["trainer.num_workers"] == "2"
    assert run.data.params["tracking.uri"] == store  # resolved on the cluster from env
    assert_secret_nowhere(PASSWORD, dashboard, sid, client, run)

    status = jobs_cli(["status", sid], env={"RAY_ADDRESS": dashboard})  # address from env
    assert status.returncode == 0, status.stderr
    assert f"{sid}  SUCCEEDED" in status.stdout and "(FINISHED)" in status.stdout


def test_stop_ends_job_and_run_killed(dashboard, store):
    out = jobs_cli(
        [
            "submit",
            "--no-wait",
            "--address",
            dashboard,
            "--tracking-uri",
            store,
            "--",
            "job=cnn_digits",
            "trainer.max_epochs=200",
            "trainer.limit_batches=5",
            "trainer.num_workers=1",
            "tracking.log_model=false",
        ]
    )
    assert out.returncode == 0, out.stdout + out.stderr
    sid = submission_id(out.stdout)
    client, run = the_run(store, sid)  # --no-wait returns once the run exists
    assert run.info.run_id in out.stdout
    # Mid-run: training has reported at least one epoch.
    wait_for(lambda: "val/acc" in client.get_run(run.info.run_id).data.metrics, 240, "first epoch")

    stopped = jobs_cli(["stop", "--address", dashboard, sid])
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"Job {sid} STOPPED" in stopped.stdout
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    listed = jobs_cli(["list", "--address", dashboard]).stdout
    assert any(ln.split()[:2] == [sid, "STOPPED"] for ln in listed.splitlines())


def test_bad_override_refused_locally_nothing_submitted(dashboard, tmp_path):
    before = len(JobSubmissionClient(dashboard).list_jobs())
    out = jobs_cli(
        ["submit", "--address", dashboard, "--tracking-uri", tracking_uri(tmp_path), "--"]
        + [*TINY, "optim.lr=0"]
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: optim.lr: must be positive, got 0.0 — set e.g. optim.lr=1e-3"
    ]
    assert "Submitted" not in out.stdout
    assert len(JobSubmissionClient(dashboard).list_jobs()) == before


def test_unreachable_cluster_is_one_line_exit_2():
    out = jobs_cli(["list", "--address", "http://127.0.0.1:9"])
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: --address: cannot reach the Ray dashboard at http://127.0.0.1:9 (Connection "
        "refused) — check the address (http://HEAD:8265) and that the head is running"
    ]
