"""Shared test fixtures.

End-to-end tests (marked `slow`) run the real `orchestrate` command as a subprocess against
one real Ray head started once per session (`ray start --head` on loopback, 2 CPUs), and
check results through MLflow's own client. Only the README demo test starts an embedded Ray.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

BIN = Path(sys.executable).parent
ORCHESTRATE = str(BIN / "orchestrate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray Train workers' process titles: Ray's own actor class (embedded runs) and ours on a
# cluster the driver joined (orchestrator/worker_actor.py).
TRAIN_WORKER_TITLES = ("RayTrainWorker", "WorkerImportingAhead")


def ray_processes() -> set[int]:
    """PIDs of Ray's per-cluster daemons and of training workers on this machine."""
    pids = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            text = p.info["name"] + " " + " ".join(p.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if any(k in text for k in ("raylet", "gcs_server", *TRAIN_WORKER_TITLES)):
            pids.add(p.pid)
    return pids


HEAD_SESSION: list[str] = []  # the session directory of the `ray_head` fixture, once started
HEAD_DASHBOARD: list[str] = []  # ... and its dashboard (Jobs API) URL


def train_workers() -> list[psutil.Process]:
    """Ray Train workers of the test head (other Ray instances on the machine are ignored)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(p.info["cmdline"] or [])
            if not any(title in cmdline for title in TRAIN_WORKER_TITLES):
                continue
            ancestry = " ".join(" ".join(a.cmdline()) for a in p.parents())
        except psutil.Error:
            continue
        if not HEAD_SESSION or HEAD_SESSION[0] in ancestry:
            found.append(p)
    return found


@pytest.fixture(autouse=True)
def no_mlflow_uri_leaks(monkeypatch):
    """mlflow.set_tracking_uri/set_registry_uri also set MLFLOW_*_URI in os.environ, which every
    later `orchestrate` subprocess would inherit (a model registered into another test's store
    was seen in CI). Each test starts without them, and they are removed again after it."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(var, "")  # recorded as absent before, so removed at teardown
        monkeypatch.delenv(var)
    yield
    # ... and the same URIs kept in MLflow's module globals, which `MlflowClient(tracking_uri)`
    # would otherwise use as its registry in every later test of this process.
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    registry_utils._registry_uri = None
    tracking_utils._tracking_uri = None


@pytest.fixture(scope="session")
def ray_head():
    """A real Ray head on loopback for the whole session; yields its address."""
    port = _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",  # token auth is issue #5's business; this head is loopback-only
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind to 127.0.0.1 only
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
        # Its own temp dir: Ray's processes find "their" cluster through a file there, which
        # other Ray instances on this machine would otherwise overwrite.
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="orc-head-", dir="/tmp"),
        # Jobs submitted to it (orchestrate-jobs) run `python` from this environment.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    dashboard_port = _free_port()
    ray = str(BIN / "ray")
    subprocess.run(
        [
            ray,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            # A full dashboard, on loopback, as `ray start --head` gives by default: Ray Train
            # frees a stopped sweep trial's placement group through its State API.
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            # The Jobs API needs this head's own agent; the default port (52365) may belong
            # to another Ray on the machine.
            f"--dashboard-agent-listen-port={_free_port()}",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    session = _session_dir_of(port)
    HEAD_SESSION.append(session)
    HEAD_DASHBOARD.append(f"http://127.0.0.1:{dashboard_port}")
    yield f"127.0.0.1:{port}"
    held = placement_groups_held(wait_s=30)  # a sweep's stopped trial is freed asynchronously
    _stop_session(session)
    # Every run on the head gave its workers' CPUs back, killed, failed or stopped ones too.
    assert not held, f"placement groups still held after the session's last test: {held}"


@pytest.fixture
def ray_driver(ray_head, monkeypatch):
    """This test process as a driver of the session's head (joined as `orchestrate` joins a
    cluster), for the length of one test."""
    import ray
    import ray._private.ray_constants as ray_constants

    from orchestrator import launch

    # What `connect` sets for a loopback-only head, undone after the test.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as the head was started
    monkeypatch.setenv(launch._LOOPBACK_ONLY, "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    launch.connect({"address": ray_head, "show_worker_logs": False, "num_cpus": None})
    yield ray
    ray.shutdown()


def head_tasks(name: str) -> list:
    """Every attempt of every task or actor call named `name` that the session's head has run
    (Ray's State API; actor calls are named `<Class>.<method>`)."""
    from ray.util.state import list_tasks

    return list_tasks(
        address=HEAD_DASHBOARD[0],
        filters=[("name", "=", name)],
        limit=10_000,
        raise_on_missing_output=False,
    )


def head_actors(class_name: str) -> set[str]:
    """The ids of every actor of `class_name` the session's head has started (Ray's State API)."""
    from ray.util.state import list_actors

    found = list_actors(
        address=HEAD_DASHBOARD[0],
        filters=[("class_name", "=", class_name)],
        limit=10_000,
        raise_on_missing_output=False,
    )
    return {a.actor_id for a in found}


def placement_groups_held(wait_s: float = 0, among: set[str] | None = None) -> set[str]:
    """Ids of the session head's placement groups not removed (of `among`, if given), after
    giving those still held up to `wait_s` to go (Ray's State API)."""
    from ray.util.state import list_placement_groups

    deadline = time.monotonic() + wait_s
    while True:
        found = list_placement_groups(
            address=HEAD_DASHBOARD[0], limit=10_000, raise_on_missing_output=False
        )
        held = {pg.placement_group_id for pg in found if pg.state != "REMOVED"}
        if among is not None:
            held &= among
        if not held or time.monotonic() >= deadline:
            return held
        time.sleep(0.5)


def _session_dir_of(port: int) -> str:
    """The session directory of the Ray head whose GCS listens on `port`."""
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["name"] == "gcs_server" and f"--gcs_server_port={port}" in cmd:
            return (
                next(a for a in p.info["cmdline"] if a.startswith("--log_dir="))
                .split("=", 1)[1]
                .rsplit("/logs", 1)[0]
            )
    raise RuntimeError(f"no gcs_server on port {port}")


def _stop_session(session: str) -> None:
    """Stop exactly this head's processes (`ray stop` would stop every Ray on the machine)."""
    # Never this process or its parents, whose command line may name the session too.
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    roots = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.pid not in mine and session in " ".join(p.info["cmdline"] or [])
    ]
    procs = {q.pid: q for p in roots for q in [p, *p.children(recursive=True)]}
    for q in procs.values():
        try:
            q.terminate()
        except psutil.Error:
            pass
    # Most exit within a second; the GCS and the autoscaler monitor can outlive SIGTERM by more
    # than 15 s (measured). The head is thrown away: kill what is left.
    _, alive = psutil.wait_procs(list(procs.values()), timeout=3)
    for q in alive:
        try:
            q.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)  # until reaped, so nothing of the head is listed after


def run_cli(
    args: list[str], cwd: Path, timeout: float = 600, **kwargs
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ORCHESTRATE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    """`orchestrate` as from a terminal, SIGINT at its default even when the suite runs as a
    background command (`make test &`, `nohup … &`), which a shell starts with SIGINT ignored
    and every child inherits: a test's Ctrl-C must reach it."""
    return subprocess.Popen(
        [ORCHESTRATE, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_sigint_default,
    )


def tracking_uri(directory: Path) -> str:
    return f"sqlite:///{directory / 'mlflow.db'}"


def runs_of(directory: Path, experiment: str = "orchestrator"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(directory))
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process ended (rc={proc.returncode}) before {what}:\n{out}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)


@contextmanager
def training_under_way(args: list[str], cwd: Path, timeout: float) -> Iterator[subprocess.Popen]:
    """`orchestrate *args` (tracking to `cwd`), handed over once a run has logged its first
    epoch (its workers and process group exist); stopped with SIGTERM afterwards, as a user
    would, so it marks its runs KILLED and shuts its Ray down."""
    proc = start_cli([*args, f"tracking.uri={tracking_uri(cwd)}"], cwd)
    try:
        wait_for(
            lambda: any("train/loss_epoch" in r.data.metrics for r in runs_of(cwd)),
            timeout,
            "the first epoch",
            proc,
        )
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except Exception:
                terminate(proc)


def pytest_terminal_summary(terminalreporter):
    """The reliability figures (`make reliability`): faults injected and survived, invariant
    violations, bad inputs tried and rejected cleanly. Printed whenever such tests ran."""
    from tests.invariants import VIOLATIONS

    counts = {"fault": [0, 0], "bad_input": [0, 0]}  # [tried, passed]
    bad_input_seconds = []  # each bad-input test runs one command: its time to be rejected
    for outcome in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", None) not in ("call", "setup"):
                continue
            if report.when == "setup" and outcome != "error":
                continue
            for marker, tally in counts.items():
                if marker in getattr(report, "keywords", {}):
                    tally[0] += 1
                    tally[1] += outcome == "passed"
                    if marker == "bad_input" and report.when == "call":
                        bad_input_seconds.append(report.duration)
    (faults, survived), (bad, rejected) = counts["fault"], counts["bad_input"]
    if not faults and not bad:
        return
    line = (
        f"faults injected: {faults}, survived: {survived}; invariant violations: {len(VIOLATIONS)}; "
        f"bad inputs tried: {bad}, rejected cleanly: {rejected}"
    )
    if bad_input_seconds:
        bad_input_seconds.sort()
        line += f" (median {bad_input_seconds[len(bad_input_seconds) // 2]:.1f} s to reject)"
    terminalreporter.write_sep("=", "reliability")
    terminalreporter.write_line(line)
    for violation in VIOLATIONS:
        terminalreporter.write_line(f"  violation: {violation}")
    out = Path("test-artifacts")
    out.mkdir(exist_ok=True)
    (out / "reliability.txt").write_text(line + "\n")
