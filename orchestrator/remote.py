"""`orchestrate-jobs`: run `orchestrate` on a remote Ray cluster through Ray's Jobs API.

    orchestrate-jobs submit --address http://HEAD:8265 -- job=cnn_digits trainer.num_workers=4
    orchestrate-jobs submit --no-wait -- job=mlp_tabular      # address from RAY_ADDRESS
    orchestrate-jobs status ID | logs ID [--follow] | stop ID | list

The config is composed and validated here, with `orchestrate`'s own code: a bad override is
one line and exit 2, and nothing is submitted. The project (code and conf/) travels as the
job's working_dir; on the cluster the entrypoint is `python -m orchestrator.cli <overrides>
cluster.address=auto`. The MLflow URI and credentials travel only as environment variables
(runtime_env env_vars), the Ray token only as an HTTP header: neither is ever on a command
line, in the job's logs, or in MLflow params and tags.

`submit` follows the job's logs to the end and exits with its result (0 SUCCEEDED,
1 FAILED, 3 STOPPED); with --no-wait it returns once the MLflow run exists.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError

PROJECT_DIR = Path(__file__).resolve().parent.parent
# Never uploaded: environments, local stores, outputs and caches (gitignored files are also
# skipped by Ray itself).
EXCLUDES = [
    ".git",
    ".venv",
    "mlruns",
    "mlflow.db",
    "mlartifacts",
    "outputs",
    "multirun",
    "test-artifacts",
    "benchmarks/results",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
]
# What the MLflow client on the cluster needs, forwarded from this shell when set.
MLFLOW_ENV = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
)
SUBMISSION_ENV = "ORCHESTRATOR_SUBMISSION_ID"  # the run gets it as a tag: how we find it
SUBMISSION_TAG = "orchestrator.submission_id"
# Ray SIGTERMs the entrypoint on `stop` and SIGKILLs it 3 s later by default; the driver
# needs a moment to mark its MLflow run KILLED, more on a loaded machine.
STOP_GRACE_S = "30"
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
CONNECT_TIMEOUT_S = 5.0
RUN_WAIT_S = 300.0  # --no-wait: the longest we wait for the job to create its MLflow run


def ray_token() -> str | None:
    """The Ray token, from the same places Ray itself looks (env, token file, ~/.ray)."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        if os.environ.get("RAY_AUTH_TOKEN_PATH"):
            raise UserError(
                "RAY_AUTH_TOKEN_PATH", f"cannot read '{path}'", "point it at the token file"
            ) from None
        return None


def dashboard_address(given: str | None) -> str:
    address = given or os.environ.get("RAY_ADDRESS", "")
    if not address:
        raise UserError(
            "--address",
            "no Ray cluster given",
            "pass --address http://HEAD:8265 (the dashboard) or set RAY_ADDRESS",
        )
    if "://" not in address:
        address = f"http://{address}"
    parsed = urllib.parse.urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(
            "--address",
            f"'{address}' is not the cluster's dashboard URL",
            "use http://HEAD:8265 (the Jobs API; ray:// Ray Client is not used)",
        )
    return address.rstrip("/")


def connect(address: str):
    """A JobSubmissionClient that has proven it can reach the cluster and is let in."""
    parsed = urllib.parse.urlparse(address)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:  # requests has no timeout of its own: a silent host would hang for minutes
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(
            "--address",
            f"cannot reach the Ray dashboard at {address} ({exc.strerror or exc})",
            "check the address (http://HEAD:8265) and that the head is running",
        ) from None
    import logging

    from ray.job_submission import JobSubmissionClient

    # Ray's client narrates packaging and uploads at INFO (some of its modules pin their own
    # level); users see the job's own output.
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)

    token = ray_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        client = JobSubmissionClient(address, headers=headers)
        client.list_jobs()  # /api/version is open to all; this one needs the token
    except Exception as exc:
        raise _as_user_error(exc, address, bool(token)) from None
    return client


def _as_user_error(exc: Exception, address: str, had_token: bool) -> UserError:
    text = str(exc)
    if "401" in text or "Authentication required" in text:
        return UserError(
            "RAY_AUTH_TOKEN",
            f"the Ray cluster at {address} requires a token and none was given",
            "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)",
        )
    if "403" in text or "Forbidden" in text or "Invalid authentication token" in text:
        return UserError(
            "RAY_AUTH_TOKEN",
            f"the Ray cluster at {address} refused the token",
            "use the cluster's token (`ray get-auth-token` on the head)",
        )
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return UserError("--address", f"Ray Jobs API at {address}: {first}", "check the address")


def tracking_uri(given: str | None, overrides: list[str]) -> tuple[str, list[str]]:
    """The MLflow URI (flag, MLFLOW_TRACKING_URI or a tracking.uri override) and the overrides
    without it: the URI goes to the cluster as an environment variable."""
    rest = [o for o in overrides if not o.startswith("tracking.uri=")]
    from_override = [o.split("=", 1)[1] for o in overrides if o.startswith("tracking.uri=")]
    uri = given or (from_override[-1] if from_override else os.environ.get("MLFLOW_TRACKING_URI"))
    if not uri:
        raise UserError(
            "tracking.uri",
            "a remote job needs a tracking server the cluster can reach",
            "pass --tracking-uri http://MLFLOW:5000 or set MLFLOW_TRACKING_URI",
        )
    parsed = urllib.parse.urlparse(uri)
    if parsed.username or parsed.password:
        raise UserError(
            "tracking.uri",
            "has credentials in it, which would end up in logs and params",
            "remove them; set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD instead",
        )
    if parsed.scheme == "sqlite" and not uri.startswith("sqlite:////"):
        raise UserError(
            "tracking.uri",
            f"'{uri}' is relative: it would land in the job's temporary working directory",
            "use an http:// MLflow server (or an absolute sqlite://// path on a one-node cluster)",
        )
    return uri, rest


def _check_overrides(overrides: list[str]) -> None:
    for o in overrides:
        if o.startswith("-"):
            raise UserError(
                o,
                "flags are not submitted (sweeps with -m and --cfg run locally only)",
                "give only key=value overrides after --",
            )
        if o.startswith("cluster.address="):
            raise UserError(
                "cluster.address",
                "is set by orchestrate-jobs (the job joins the cluster it runs on)",
                "choose the cluster with --address",
            )


def submit(args) -> int:
    from orchestrator import cli

    _check_overrides(args.overrides)
    overrides = [o for o in args.overrides if not o.startswith("tracking.uri=")]
    cli._reject_sweeps_without_m(overrides)
    # The same composition and checks as `orchestrate`, on this machine, before anything leaves.
    cfg = cli.compose_config([*args.overrides, "cluster.address=auto"])
    uri, overrides = tracking_uri(args.tracking_uri, args.overrides)
    name, experiment = cfg["job"]["name"], cfg["tracking"]["experiment"]
    client = connect(dashboard_address(args.address))

    sid = f"{name}-{secrets.token_hex(4)}"
    env = {k: os.environ[k] for k in MLFLOW_ENV if os.environ.get(k)}
    env.update(
        {"MLFLOW_TRACKING_URI": uri, SUBMISSION_ENV: sid, "RAY_JOB_STOP_WAIT_TIME_S": STOP_GRACE_S}
    )
    # Resolved on the cluster from the environment, so the URI is never on the command line.
    remote = [*overrides, "cluster.address=auto", "tracking.uri=${oc.env:MLFLOW_TRACKING_URI}"]
    import shlex

    job = dict(
        entrypoint="python -m orchestrator.cli " + shlex.join(remote),
        submission_id=sid,
        runtime_env={"working_dir": str(PROJECT_DIR), "excludes": EXCLUDES, "env_vars": env},
        metadata={"job": name, "tracking_uri": uri, "experiment": experiment},
    )
    _submit_when_ready(client, job)
    print(f"Submitted {sid}", flush=True)
    if args.no_wait:
        link = wait_for_run(client, sid, uri, experiment, RUN_WAIT_S)
        print(f"MLflow run: {link}" if link else _no_run_yet(sid), flush=True)
        print(f"Follow it: orchestrate-jobs logs {sid} --follow", flush=True)
        return 0
    threading.Thread(target=lambda: _print_link(client, sid, uri, experiment), daemon=True).start()
    return follow(client, sid)


def _submit_when_ready(client, job: dict[str, Any], wait_s: float = 60.0) -> None:
    """Submit; a head that has just started answers "No available agent" for a while."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.submit_job(**job)
            return
        except RuntimeError as exc:
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise UserError(
                "--address",
                f"the cluster did not accept the job ({str(exc).strip().splitlines()[0]})",
                "check the head's dashboard and `ray status` there",
            ) from None


def _no_run_yet(sid: str) -> str:
    return f"MLflow run not created yet; `orchestrate-jobs status {sid}` shows it later"


def _print_link(client, sid, uri, experiment) -> None:
    link = wait_for_run(client, sid, uri, experiment, float("inf"))
    if link:
        print(f"MLflow run: {link}", flush=True)


def find_run(uri: str, experiment: str, sid: str):
    """The job's MLflow run, found by the submission id the job tags it with."""
    # One quick try: the server may not be reachable from here (e.g. a cluster-internal name),
    # and MLflow's default retries would take minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///") :]):
        return None  # let the job create (and migrate) a new store alone
    try:
        c = MlflowClient(tracking_uri=uri)
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            return None
        found = c.search_runs([exp.experiment_id], f"tags.`{SUBMISSION_TAG}` = '{sid}'")
        return found[0] if found else None
    except Exception:
        return None


def run_link(uri: str, run) -> str:
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return f"{run.info.run_id} in {uri}"


def wait_for_run(client, sid: str, uri: str, experiment: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = find_run(uri, experiment, sid)
        if run is not None:
            return run_link(uri, run)
        if str(client.get_job_status(sid)) in EXIT_CODES:
            return None  # ended without (or before) a run: its logs say why
        time.sleep(1.0)
    return None


def follow(client, sid: str) -> int:
    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nStopped following; the job goes on. Stop it: orchestrate-jobs stop {sid}")
        return 130
    return _result(client, sid)


def _result(client, sid: str) -> int:
    info = client.get_job_info(sid)
    while str(info.status) not in EXIT_CODES:  # the log stream can end just before the status
        time.sleep(0.5)
        info = client.get_job_info(sid)
    status = str(info.status)
    print(f"Job {sid} {status}" + (f": {info.message}" if status != "SUCCEEDED" else ""))
    return EXIT_CODES[status]


def _client(args):
    return connect(dashboard_address(args.address))


def _job_info(client, sid: str):
    try:
        return client.get_job_info(sid)
    except RuntimeError:
        raise UserError(
            sid, "no such job on this cluster", "list the jobs with `orchestrate-jobs list`"
        ) from None


def status(args) -> int:
    client = _client(args)
    info = _job_info(client, args.id)
    print(f"{args.id}  {info.status}" + (f"  {info.message}" if info.message else ""))
    meta: dict[str, Any] = info.metadata or {}
    if meta.get("tracking_uri"):
        run = find_run(meta["tracking_uri"], meta.get("experiment", ""), args.id)
        if run is not None:
            print(f"MLflow run: {run_link(meta['tracking_uri'], run)} ({run.info.status})")
    return 0


def logs(args) -> int:
    client = _client(args)
    _job_info(client, args.id)
    if args.follow:
        return follow(client, args.id)
    sys.stdout.write(client.get_job_logs(args.id))
    return 0


def stop(args) -> int:
    client = _client(args)
    _job_info(client, args.id)
    client.stop_job(args.id)
    if not args.no_wait:
        _result(client, args.id)
    return 0


def list_jobs(args) -> int:
    client = _client(args)
    rows = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    print(f"{'SUBMISSION ID':<28} {'STATUS':<10} {'JOB':<20} STARTED")
    for j in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000))
        job = (j.metadata or {}).get("job", "-")
        print(f"{j.submission_id or j.job_id or '-':<28} {j.status!s:<10} {job:<20} {started}")
    return 0


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address",
        help="the cluster's dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)",
    )
    p = argparse.ArgumentParser(
        prog="orchestrate-jobs",
        description="Submit, follow and manage orchestrate jobs on a remote Ray cluster. "
        "Credentials come from the environment: RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, "
        "~/.ray/auth_token), MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", parents=[common], help="validate here, then run on the cluster")
    s.add_argument("--no-wait", action="store_true", help="return once the MLflow run exists")
    s.add_argument("--tracking-uri", help="MLflow server (default: $MLFLOW_TRACKING_URI)")
    s.add_argument("overrides", nargs="*", help="orchestrate's overrides, after --")
    s.set_defaults(func=submit)
    for name, func, text in (("status", status, "status and MLflow run"), ("logs", logs, "logs")):
        c = sub.add_parser(name, parents=[common], help=f"a job's {text}")
        c.add_argument("id")
        if name == "logs":
            c.add_argument("--follow", "-f", action="store_true", help="stream until it ends")
        c.set_defaults(func=func)
    c = sub.add_parser("stop", parents=[common], help="stop a job (its MLflow run ends KILLED)")
    c.add_argument("id")
    c.add_argument("--no-wait", action="store_true", help="don't wait for it to end")
    c.set_defaults(func=stop)
    sub.add_parser("list", parents=[common], help="jobs on the cluster").set_defaults(
        func=list_jobs
    )
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
