"""A production-like stack, started for real on loopback, and a job submitted through it.

    PostgreSQL (Debian's package, `make postgres`)  ◄─ MLflow server, basic auth, artifacts served
    Ray head with token authentication (RAY_AUTH_MODE=token)  ◄─ `orchestrate-jobs submit`

What it proves: a job with the right Ray token and MLflow credentials trains and is recorded;
without the token it is refused (one line, exit 2); anonymous writes to MLflow are refused
(401); the credentials appear in no log, entrypoint, param or tag; and nothing of the stack
listens beyond 127.0.0.1.
"""

from __future__ import annotations

import base64
import glob
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import BIN, _free_port, _session_dir_of, _stop_session

pytestmark = pytest.mark.slow

JOBS = str(BIN / "orchestrate-jobs")


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
    return (mapped or address).is_loopback


def pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        pytest.fail(f"PostgreSQL's {name} not found: run `make postgres` (apt-get postgresql)")
    return found[-1]


def as_pg_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: use Debian's `postgres` account when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"{url} not up after {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def stack():
    # Not under pytest's tmp_path: its parents are private to root, and PostgreSQL runs as
    # the `postgres` account.
    root = Path(tempfile.mkdtemp(prefix="orc-stack-", dir="/tmp"))
    os.chmod(root, 0o755)
    s = {"root": root, "db_password": secrets.token_urlsafe(16), "pids": []}
    s["admin_password"] = "adm-" + secrets.token_urlsafe(16)
    s["password"] = "trn-" + secrets.token_urlsafe(16)
    s["ray_token"] = secrets.token_hex(32)
    try:
        _start_postgres(s)
        _start_mlflow(s)
        _start_ray(s)
        yield s
    finally:
        # Every Ray process of this head, even if `ray start` itself failed half-way.
        _stop_session(str(root / "ray"))
        if "mlflow" in s:
            _stop_tree(s["mlflow"].pid)
        if "pgdata" in s:
            subprocess.run(
                as_pg_user([pg_bin("pg_ctl"), "-D", s["pgdata"], "-m", "fast", "stop"]),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)


def _stop_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
    except psutil.Error:
        return
    procs = [parent, *parent.children(recursive=True)]
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def _start_postgres(s) -> None:
    pgdata, pwfile = s["root"] / "pgdata", s["root"] / "pw"
    pwfile.write_text(s["db_password"])
    if os.geteuid() == 0:
        shutil.chown(s["root"], "postgres")
        shutil.chown(pwfile, "postgres")
    s["pg_port"] = _free_port()
    subprocess.run(
        as_pg_user(
            [pg_bin("initdb"), "-D", str(pgdata), "-U", "orc", "--auth=scram-sha-256"]
            + [f"--pwfile={pwfile}", "--no-sync"]
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    pwfile.unlink()
    options = f"-p {s['pg_port']} -c listen_addresses=127.0.0.1 -k {s['root']}"
    subprocess.run(
        as_pg_user([pg_bin("pg_ctl"), "-D", str(pgdata), "-o", options, "-w", "-t", "60"])
        + ["-l", str(s["root"] / "postgres.log"), "start"],
        check=True,
        capture_output=True,
        timeout=90,
    )
    s["pgdata"] = str(pgdata)
    import psycopg2

    conn = psycopg2.connect(
        host="127.0.0.1",
        port=s["pg_port"],
        user="orc",
        password=s["db_password"],
        dbname="postgres",
    )
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE DATABASE mlflow")
        cur.execute("CREATE DATABASE mlflow_auth")
    conn.close()


def _start_mlflow(s) -> None:
    root, port = s["root"], _free_port()
    # +psycopg2: SQLAlchemy 2.1's plain postgresql:// means psycopg 3. No password in the URI
    # (it would show in `ps`): libpq reads PGPASSWORD.
    db = f"postgresql+psycopg2://orc@127.0.0.1:{s['pg_port']}"
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {db}/mlflow_auth\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        **os.environ,
        "PGPASSWORD": s["db_password"],
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": s["admin_password"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    log = root / "mlflow.log"
    s["mlflow"] = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--app-name", "basic-auth"]
        + ["--backend-store-uri", f"{db}/mlflow", "--serve-artifacts"]
        + ["--artifacts-destination", str(root / "artifacts")]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        + ["--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    s["uri"] = f"http://127.0.0.1:{port}"
    wait_http(f"{s['uri']}/health", 600, s["mlflow"], log)  # minutes only on a loaded machine
    # A non-admin account for training jobs, created by the admin through the auth REST API
    # (plain HTTP: importing MLflow's auth client loads the whole server app).
    request = urllib.request.Request(
        f"{s['uri']}/api/2.0/mlflow/users/create",
        data=json.dumps({"username": "trainer", "password": s["password"]}).encode(),
        headers={"Content-Type": "application/json", **basic_auth("admin", s["admin_password"])},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200


def basic_auth(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _start_ray(s) -> None:
    port, dashboard = _free_port(), _free_port()
    home = s["root"] / "home"  # no ~/.ray/auth_token of this machine's user can stand in
    home.mkdir()
    s["home"] = str(home)
    env = {
        **os.environ,
        "HOME": str(home),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": s["ray_token"],
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback only, as in conftest's head
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
        "RAY_TMPDIR": str(s["root"] / "ray"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    (s["root"] / "ray").mkdir()
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2"]
        + ["--include-dashboard=true", "--dashboard-host=127.0.0.1"]
        + [f"--dashboard-port={dashboard}", "--disable-usage-stats"]
        # Its own agent port: the default (52365) is taken by any other Ray on the machine, and
        # without an agent the Jobs API answers "No available agent".
        + [f"--dashboard-agent-listen-port={_free_port()}"],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,  # ~10 s on an idle machine; minutes when the cores are oversubscribed
    )
    s["session"] = _session_dir_of(port)
    s["address"] = f"http://127.0.0.1:{dashboard}"


def jobs_cli(s, args: list[str], **env: str):
    """`orchestrate-jobs` as a user would run it: credentials only in its environment."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_AUTH", "MLFLOW_TRACKING_", "RAY_ADDRESS"))
    }
    return subprocess.run(
        [JOBS, *args],
        capture_output=True,
        text=True,
        timeout=400,
        env={**clean, "HOME": s["home"], **env},
    )


def test_job_with_token_and_credentials_trains_and_is_recorded(stack):
    s = stack
    out = jobs_cli(
        s,
        ["submit", "--address", s["address"], "--tracking-uri", s["uri"], "--"]
        + ["job=cnn_digits", "trainer.max_epochs=1", "trainer.limit_batches=5"]
        + ["trainer.num_workers=1", "tracking.experiment=secure"],
        RAY_AUTH_TOKEN=s["ray_token"],
        MLFLOW_TRACKING_USERNAME="trainer",
        MLFLOW_TRACKING_PASSWORD=s["password"],
    )
    assert out.returncode == 0, out.stdout + out.stderr
    sid = next(ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("Submitted "))

    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_TRACKING_USERNAME"] = "trainer"
    os.environ["MLFLOW_TRACKING_PASSWORD"] = s["password"]
    try:
        client = MlflowClient(s["uri"])
        exp = client.get_experiment_by_name("secure")
        (run,) = client.search_runs(
            [exp.experiment_id], f"tags.`orchestrator.submission_id`='{sid}'"
        )
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    link = f"{s['uri']}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
    assert f"MLflow run: {link}" in out.stdout
    assert run.info.status == "FINISHED"
    assert {"val/acc", "val/loss", "train/loss_epoch"} <= set(run.data.metrics)
    assert "config.yaml" in artifacts  # through the server's artifact proxy, into PostgreSQL's peer

    # No secret in the job's logs, its entrypoint, or the run's params and tags.
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(s["address"], headers={"Authorization": f"Bearer {s['ray_token']}"})
    info, logs = jobs.get_job_info(sid), jobs.get_job_logs(sid)
    for secret in (s["password"], s["ray_token"], s["db_password"]):
        assert secret not in logs
        assert secret not in info.entrypoint
        assert secret not in repr(run.data.params) + repr(run.data.tags)
        assert secret not in out.stdout + out.stderr


def test_submission_without_token_is_refused(stack):
    s = stack
    out = jobs_cli(
        s,
        ["submit", "--address", s["address"], "--tracking-uri", s["uri"], "--", "job=cnn_digits"],
        MLFLOW_TRACKING_USERNAME="trainer",
        MLFLOW_TRACKING_PASSWORD=s["password"],
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: RAY_AUTH_TOKEN: the Ray cluster at {s['address']} requires a token and none "
        "was given — set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)"
    ]
    wrong = jobs_cli(s, ["list", "--address", s["address"]], RAY_AUTH_TOKEN="0" * 64)
    assert wrong.returncode == 2
    assert "refused the token" in wrong.stderr


def test_anonymous_mlflow_write_is_refused(stack):
    request = urllib.request.Request(
        f"{stack['uri']}/api/2.0/mlflow/experiments/create",
        data=b'{"name": "anonymous"}',
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401


def test_nothing_listens_beyond_loopback(stack):
    roots = [stack["mlflow"].pid]
    roots += [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if stack["session"] in " ".join(p.info["cmdline"] or [])
        or stack["pgdata"] in " ".join(p.info["cmdline"] or [])
    ]
    procs: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            parent = psutil.Process(pid)
            procs.update({q.pid: q for q in [parent, *parent.children(recursive=True)]})
        except psutil.Error:  # gone meanwhile (e.g. a short-lived Ray worker)
            continue
    listening = []
    for p in procs.values():
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
                    listening.append((p.name(), c.laddr.ip, c.laddr.port))
        except psutil.Error:
            continue
    names = {name for name, _, _ in listening}
    assert {"postgres", "gcs_server", "raylet"} <= names, listening  # the stack was seen
    assert any(port == int(stack["uri"].rsplit(":", 1)[1]) for _, _, port in listening)
    exposed = [entry for entry in listening if not is_loopback(entry[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"
