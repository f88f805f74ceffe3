"""`orchestrate resume=<run id>`: finish a job whose driver stopped, in the same MLflow run.

    orchestrate resume=3f9c...                      # after Ctrl-C, SIGTERM, a killed driver,
    orchestrate resume=3f9c... cluster.address=auto #   or a tracking server that went away

The job's own overrides are replayed from the run's tags, so the config is the one the run was
started with (only `tracking.*` and `cluster.*` may be given again: where, not what). Ray Train
finds the run's checkpoints under `cluster.storage_path` by the run's name and continues from
the latest intact one; metrics already in MLflow are not sent again, and metrics a tracking
outage left on disk are delivered. The run ends FINISHED as if it had never stopped.

A run whose driver is still alive is not resumed: two drivers of one run would train it twice
into the same checkpoint directory. Each driver tags its run with who it is (`DRIVER_TAG`:
host, pid and the process's start time, so a reused pid is not mistaken for it); a resume on
that host refuses while that process lives. A driver on another machine cannot be checked
from here and is not.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from orchestrator import preflight, tracking
from orchestrator.errors import UserError

KEY = "resume"
WHERE = ("tracking.", "cluster.")  # what may differ between the first start and the resume
DRIVER_TAG = "orchestrator.driver"  # e.g. "laptop pid 4242 started 1765090000.12"


def driver_tag(pid: int | None = None) -> str:
    """A process of this host (by default this one) as a run's driver: host, pid and start
    time (see the module docstring); `live_driver` reads it back."""
    import socket

    import psutil

    proc = psutil.Process(pid)
    return f"{socket.gethostname()} pid {proc.pid} started {proc.create_time():.2f}"


def live_driver(tags: dict[str, str]) -> int | None:
    """The pid of the run's driver if it still runs on this machine, else None."""
    import socket

    import psutil

    parts = tags.get(DRIVER_TAG, "").split()
    if len(parts) != 5 or parts[0] != socket.gethostname():
        return None
    try:
        proc = psutil.Process(int(parts[2]))
        same = f"{proc.create_time():.2f}" == parts[4]
        return proc.pid if same and proc.status() != psutil.STATUS_ZOMBIE else None
    except (psutil.Error, ValueError):
        return None


def refuse_if_driven(run, key: str = KEY) -> None:
    """Stop a resume of a run whose driver is still running here (see the module docstring)."""
    pid = live_driver(run.data.tags)
    if pid is not None:
        raise UserError(
            key,
            f"run '{run.info.run_id}' is still being driven by process {pid} on this machine",
            f"let it finish, or stop it (Ctrl-C in its terminal, or kill -TERM {pid}) and then resume",
        )


def split(overrides: list[str]) -> tuple[list[str], str | None]:
    """Take `resume=<id>` out of the overrides (it is a command, not part of the config)."""
    rest = [o for o in overrides if not o.startswith(f"{KEY}=")]
    given = [o.split("=", 1)[1] for o in overrides if o.startswith(f"{KEY}=")]
    if not given:
        return overrides, None
    if len(given) > 1 or not given[0]:
        raise UserError(KEY, "needs exactly one run id", "e.g. resume=<MLflow run id>")
    return rest, given[0]


def recorded_run(overrides: list[str], run_id: str, key: str = KEY):
    """The MLflow run to resume, found in the store this command's `tracking.*` points at."""
    from orchestrator.cli import compose_config

    here = [o for o in overrides if o.startswith(WHERE)]
    uri = preflight.resolve_tracking_uri(compose_config(here)["tracking"]["uri"], os.getcwd())
    preflight.check_tracking(uri)
    missing = UserError(
        key,
        f"no MLflow run '{run_id}' in {uri}",
        "pass the run id printed, with the same tracking.uri",
    )
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///") :]):
        raise missing  # and don't create an empty store while looking
    try:
        return tracking.client(uri).get_run(run_id)
    except Exception:
        raise missing from None


def replayed_overrides(run, overrides: list[str]) -> list[str]:
    """The run's own overrides, with this command's `tracking.*`/`cluster.*` in place of its."""
    original = shlex.split(run.data.tags.get("orchestrator.overrides", ""))
    here = [o for o in overrides if o.startswith(WHERE)]
    return [o for o in original if not o.startswith(WHERE)] + here


def job_overrides(overrides: list[str], run_id: str) -> list[str]:
    """For `orchestrate resume=<id> [tracking.*] [cluster.*]`: the overrides to compose."""
    changed = [o for o in overrides if not o.startswith(WHERE)]
    if changed:
        raise UserError(
            KEY,
            f"cannot be combined with '{changed[0]}': a resumed run keeps its config",
            "give only resume=<id> (plus tracking.*/cluster.* if they differ); start a new run to change the config",
        )
    run = recorded_run(overrides, run_id)
    if run.data.tags.get("orchestrator.sweep") == "true" or "mlflow.parentRunId" in run.data.tags:
        raise UserError(
            KEY,
            f"run '{run_id}' belongs to a sweep",
            "use orchestrate -m sweep.resume=<parent run id>",
        )
    if run.info.status == "FINISHED":
        raise UserError(KEY, f"run '{run_id}' already FINISHED", "nothing to resume")
    refuse_if_driven(run)
    return replayed_overrides(run, overrides)


def reopen(cfg: dict[str, Any], run_id: str, run_dir: str) -> None:
    """Check the run can continue here with this config, then mark it RUNNING again."""
    uri = cfg["tracking"]["uri"]
    c = tracking.client(uri)
    run = c.get_run(run_id)  # one read: its params are compared, its tags cleaned up
    logged = run.data.params
    now = tracking.flatten(cfg)
    differ = [k for k in sorted(logged) if not k.startswith(WHERE) and now.get(k) != logged[k]]
    if differ:  # MLflow params are immutable: the resumed run must be the same run
        k = differ[0]
        raise UserError(
            k,
            f"was '{logged[k]}' when run '{run_id}' started, is '{now.get(k)}' now "
            f"({len(differ)} setting(s) differ; the code's defaults changed?)",
            "resume with the code the run started with, or start a new run",
        )
    if "://" not in run_dir and not os.path.isdir(run_dir):
        raise UserError(
            "cluster.storage_path",
            f"no checkpoints of run '{run_id}' at {run_dir}",
            "resume from the directory the job was started in, or set cluster.storage_path to where its checkpoints are",
        )
    if "error" in run.data.tags:  # the reason it stopped no longer applies
        c.delete_tag(run_id, "error")
    c.set_tag(run_id, DRIVER_TAG, driver_tag())
    c.update_run(run_id, status="RUNNING")


def command(run_id: str, overrides: list[str]) -> str:
    """The one command that resumes this run, as printed to the user."""
    where = [shlex.quote(o) for o in overrides if o.startswith(WHERE)]
    return " ".join(["orchestrate", f"{KEY}={run_id}", *where])
