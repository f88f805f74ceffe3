"""Fault injection on a real local Ray (2 gloo workers): whatever fails, no work is lost.

Every test injects real faults — SIGKILL of a chosen rank's process, SIGKILL/SIGTERM of the
driver, a damaged checkpoint file, a tracking server stopped mid-run — and then checks the
invariants of `tests/invariants.py` against one undisturbed run of the same config: one MLflow
run, every metric step exactly once with no gaps, the same values to 1e-6, terminal status,
unchanged params, no worker process left.

    pytest tests/test_faults.py -v          # or `make reliability` for the whole matrix
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import (
    ORCHESTRATE,
    _free_port,
    placement_groups_held,
    runs_of,
    tracking_uri,
    train_workers,
    wait_for,
)
from tests.invariants import assert_invariants, assert_no_workers_left, record

pytestmark = [pytest.mark.slow, pytest.mark.fault]

# Small batches make epochs long enough (45 steps) that a kill lands mid-epoch.
JOB = [
    "job=cnn_digits",
    "trainer.max_epochs=4",
    "trainer.batch_size=16",
    "trainer.log_every_n_steps=5",
    "tracking.log_model=false",
]


class Driver:
    """An `orchestrate` process whose output goes to a file, so a test can watch it live."""

    def __init__(self, args: list[str], cwd: Path):
        self.cwd = cwd
        self.log = cwd / f"driver-{time.monotonic_ns()}.log"
        self._out = open(self.log, "w")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            [ORCHESTRATE, *args], cwd=cwd, stdout=self._out, stderr=subprocess.STDOUT, text=True
        )

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 600) -> tuple[int, str]:
        try:
            self.proc.wait(timeout)
        finally:
            self.kill()
        return self.proc.returncode, self.output()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._out.close()


def run_dir(cwd: Path, run_id: str) -> Path:
    return cwd / "outputs" / "ray" / f"cnn_digits-{run_id}"


def the_run_id(cwd: Path, driver: Driver) -> str:
    runs = wait_for(lambda: runs_of(cwd), 240, "the MLflow run", driver.proc)
    return runs[0].info.run_id


def wait_epochs(client: MlflowClient, run_id: str, n: int, driver: Driver) -> None:
    wait_for(
        lambda: len(client.get_metric_history(run_id, "epoch")) >= n,
        300,
        f"epoch {n} in MLflow",
        driver.proc,
    )


def kill_rank(cwd: Path, run_id: str, rank: int, started_after: float = 0.0) -> float:
    """SIGKILL the process that is `rank` in a worker group that recorded itself after
    `started_after` (the time of the previous kill: a process of the group that kill tears
    down may still be alive for a moment, and must not be mistaken for the restarted one).
    Returns the time of this kill."""
    path = run_dir(cwd, run_id) / "workers" / f"rank-{rank}.json"

    def current_pid():
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        fresh = info["time"] > started_after and psutil.pid_exists(info["pid"])
        return info["pid"] if fresh else None

    pid = wait_for(current_pid, 300, f"rank {rank}'s process")
    time.sleep(0.5)  # into the epoch's steps, past setup
    os.kill(pid, signal.SIGKILL)
    return time.time()


def disturbed_record(cwd: Path):
    client = MlflowClient(tracking_uri(cwd))
    runs = runs_of(cwd)
    return runs, record(client, runs[0].info.run_id)


@pytest.fixture(scope="session")
def reference(ray_head, tmp_path_factory):
    """The same job, undisturbed: what every disturbed run must end up identical to."""
    cwd = tmp_path_factory.mktemp("reference")
    code, out = Driver([*JOB, f"cluster.address={ray_head}"], cwd).wait()
    assert code == 0, out
    (run,) = runs_of(cwd)
    return record(MlflowClient(tracking_uri(cwd)), run.info.run_id)


def test_kill_nonzero_rank_mid_epoch_resumes_in_the_same_run(tmp_path, ray_head, reference):
    driver = Driver([*JOB, "trainer.max_failures=1", f"cluster.address={ray_head}"], tmp_path)
    run_id = the_run_id(tmp_path, driver)
    wait_epochs(MlflowClient(tracking_uri(tmp_path)), run_id, 2, driver)
    kill_rank(tmp_path, run_id, rank=1)
    code, out = driver.wait()
    assert code == 0, out
    assert "resumed from the checkpoint of epoch" in out  # from a checkpoint, not from zero
    assert "resumed from the checkpoint of epoch 0" not in out
    assert_invariants(*disturbed_record(tmp_path), reference)
    assert_no_workers_left(train_workers)


def test_rank0_killed_and_three_kills_within_max_failures(tmp_path, ray_head, reference):
    driver = Driver([*JOB, "trainer.max_failures=3", f"cluster.address={ray_head}"], tmp_path)
    run_id = the_run_id(tmp_path, driver)
    client = MlflowClient(tracking_uri(tmp_path))
    wait_epochs(client, run_id, 1, driver)
    first = kill_rank(tmp_path, run_id, rank=0)  # rank 0: the one that logs to MLflow
    second = kill_rank(tmp_path, run_id, rank=1, started_after=first)  # the restarted group
    wait_epochs(client, run_id, 2, driver)
    kill_rank(tmp_path, run_id, rank=0, started_after=second)
    code, out = driver.wait()
    assert code == 0, out
    assert out.count("resumed from the checkpoint of epoch") == 3, out
    assert_invariants(*disturbed_record(tmp_path), reference)
    assert_no_workers_left(train_workers)


def test_more_failures_than_max_failures_fail_the_run_with_the_cause(tmp_path, ray_head, reference):
    driver = Driver([*JOB, "trainer.max_failures=1", f"cluster.address={ray_head}"], tmp_path)
    run_id = the_run_id(tmp_path, driver)
    wait_epochs(MlflowClient(tracking_uri(tmp_path)), run_id, 1, driver)
    first = kill_rank(tmp_path, run_id, rank=1)
    kill_rank(tmp_path, run_id, rank=1, started_after=first)
    code, out = driver.wait()
    assert code == 1, out
    assert "marked FAILED" in out and "resume=" in out  # the cause and what to do next
    runs, disturbed = disturbed_record(tmp_path)
    assert disturbed.tags.get("error"), "the run must say why it failed"
    assert_invariants(runs, disturbed, reference, status="FAILED")
    assert_no_workers_left(train_workers)


def test_driver_killed_then_resumed_with_one_command(tmp_path, ray_head, reference):
    before = placement_groups_held()
    driver = Driver([*JOB, f"cluster.address={ray_head}"], tmp_path)
    run_id = the_run_id(tmp_path, driver)
    # While its driver lives, the run is not resumed (two drivers would train it twice).
    code, out = Driver([f"resume={run_id}", f"cluster.address={ray_head}"], tmp_path).wait()
    assert code == 2 and f"still being driven by process {driver.proc.pid}" in out, out
    assert driver.proc.poll() is None and "Resuming" not in out
    wait_epochs(MlflowClient(tracking_uri(tmp_path)), run_id, 2, driver)
    workers_group = placement_groups_held() - before
    assert workers_group, "the run's workers hold a placement group while they train"
    driver.proc.send_signal(signal.SIGKILL)  # no chance to clean up or mark the run
    driver.wait()
    # Ray ends a dead driver's job: its Train controller and workers go with it, and the
    # workers' placement group is removed (a single job runs without Ray Train's cleaner).
    assert_no_workers_left(train_workers)
    assert not placement_groups_held(wait_s=30, among=workers_group), workers_group
    code, out = Driver([f"resume={run_id}", f"cluster.address={ray_head}"], tmp_path).wait()
    assert code == 0, out
    assert f"Resuming MLflow run {run_id}" in out
    assert "resumed from the checkpoint of epoch" in out
    assert_invariants(*disturbed_record(tmp_path), reference)
    assert_no_workers_left(train_workers)


def test_sigterm_then_resume_skips_a_corrupt_latest_checkpoint(tmp_path, ray_head, reference):
    driver = Driver([*JOB, f"cluster.address={ray_head}"], tmp_path)
    run_id = the_run_id(tmp_path, driver)
    wait_epochs(MlflowClient(tracking_uri(tmp_path)), run_id, 3, driver)
    driver.proc.send_signal(signal.SIGTERM)
    code, out = driver.wait(120)
    assert code == 128 + signal.SIGTERM, out
    assert "marked KILLED" in out
    command = next(ln for ln in out.splitlines() if "continue with: " in ln)
    assert f"orchestrate resume={run_id} " in command and f"cluster.address={ray_head}" in command
    runs, stopped = disturbed_record(tmp_path)
    assert stopped.status == "KILLED"
    assert_no_workers_left(train_workers)

    # Damage the checkpoint Ray will hand back (its latest registered one) as a crash mid-copy
    # would: truncate its state file. Ray keeps the one before it (num_to_keep=2).
    snapshot = json.loads(
        (run_dir(tmp_path, run_id) / "checkpoint_manager_snapshot.json").read_text()
    )
    latest = run_dir(tmp_path, run_id) / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    others = [
        d for d in run_dir(tmp_path, run_id).glob("checkpoint_*/") if d != latest and d.is_dir()
    ]
    assert others, "no other checkpoint kept to fall back to"
    # The fallback is the newest intact one (a checkpoint written just as SIGTERM arrived,
    # complete but not yet registered by Ray, counts: its checksum proves it whole).
    fallback = max(others, key=lambda d: json.loads((d / "meta.json").read_text())["epoch"])
    state = latest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])

    code, out = Driver([f"resume={run_id}", f"cluster.address={ray_head}"], tmp_path).wait()
    assert code == 0, out
    assert "checksum mismatch" in out and f"resumed from {fallback.name}" in out
    assert_invariants(*disturbed_record(tmp_path), reference)
    assert_no_workers_left(train_workers)


# --- The tracking server goes away ----------------------------------------------------------


class MlflowServer:
    """A real `mlflow server` on loopback over a SQLite file, stoppable and restartable."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, _free_port(), None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        mlflow = str(Path(sys.executable).parent / "mlflow")
        self.proc = subprocess.Popen(
            [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
            # MLflow 3's server also starts a pool of job-runner processes; not needed here.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )  # fmt: skip
        wait_for(self._healthy, 300, "the MLflow server")  # a hang guard: slow on a busy machine

    def _healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn workers
            self.proc.wait(30)


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


def server_record(server: MlflowServer):
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("orchestrator")
    runs = client.search_runs([exp.experiment_id])
    return runs, record(client, runs[0].info.run_id)


def test_tracking_server_down_mid_run_loses_no_metric(tmp_path, ray_head, reference, mlflow_server):
    # The server is away longer than training takes: the metrics wait (up to
    # tracking.outage_wait_s, default 60 s) for it to come back.
    args = [*JOB, f"cluster.address={ray_head}", f"tracking.uri={mlflow_server.uri}"]
    driver = Driver(args, tmp_path)
    client = MlflowClient(mlflow_server.uri)
    runs = wait_for(lambda: server_record_or_none(mlflow_server), 240, "the run", driver.proc)
    run_id = runs[0].info.run_id
    wait_epochs(client, run_id, 1, driver)
    mlflow_server.stop()
    # Training goes on without the server: two more epochs end (the driver's own progress).
    wait_for(lambda: "epoch   3/4" in driver.output(), 300, "epoch 3 without MLflow", driver.proc)
    assert (run_dir(tmp_path, run_id) / "undelivered_metrics.jsonl").exists()
    mlflow_server.start()
    code, out = driver.wait()
    assert code == 0, out
    assert_invariants(*server_record(mlflow_server), reference)
    assert not (run_dir(tmp_path, run_id) / "undelivered_metrics.jsonl").exists()
    assert_no_workers_left(train_workers)


def test_tracking_server_gone_until_the_end_then_resume_delivers(
    tmp_path, ray_head, reference, mlflow_server
):
    args = [
        *JOB,
        f"cluster.address={ray_head}",
        f"tracking.uri={mlflow_server.uri}",
        "tracking.outage_wait_s=5",  # then give up and keep the metrics on disk
    ]
    driver = Driver(args, tmp_path)
    runs = wait_for(lambda: server_record_or_none(mlflow_server), 240, "the run", driver.proc)
    run_id = runs[0].info.run_id
    wait_epochs(MlflowClient(mlflow_server.uri), run_id, 1, driver)
    mlflow_server.stop()
    code, out = driver.wait()
    assert code == 1, out
    assert "unreachable" in out
    command = next(ln for ln in out.splitlines() if "finish the run with: " in ln)
    spill = run_dir(tmp_path, run_id) / "undelivered_metrics.jsonl"
    kept = spill.read_text().splitlines()
    assert any('"key": "val/acc"' in line for line in kept)  # kept on disk, not dropped

    mlflow_server.start()
    resume_args = command.split("finish the run with: orchestrate ", 1)[1].split()
    code, out = Driver(resume_args, tmp_path).wait()
    assert code == 0, out
    assert_invariants(*server_record(mlflow_server), reference)
    assert not spill.exists()
    assert_no_workers_left(train_workers)


def server_record_or_none(server: MlflowServer):
    exp = MlflowClient(server.uri).get_experiment_by_name("orchestrator")
    return exp and MlflowClient(server.uri).search_runs([exp.experiment_id])
