"""One training job on the driver, from validated config to a terminal MLflow run.

Order matters and is the point of this module:
  1. pre-flight: tracking store and cluster reachable, workers placeable — else exit 2
     with nothing started;
  2. start or join Ray;
  3. create the MLflow run (params, tags, resolved config);
  4. fit on Ray while showing progress; Ctrl-C / SIGTERM end the run KILLED;
  5. log the final model (and register it), and mark the run FINISHED — or FAILED.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator import launch, preflight, resume, shared_data, tracking
from orchestrator.errors import TrainingFailed
from orchestrator.interrupts import DeferredInterrupts
from orchestrator.job import load_job
from orchestrator.progress import ProgressDisplay

PROJECT_DIR = Path(__file__).resolve().parent.parent


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# While training: Interrupted at once, except inside the driver's MLflow writes.
_INTERRUPTS = DeferredInterrupts(Interrupted)


def _run_name(job: str, overrides: list[str]) -> str:
    shown = [o for o in overrides if not o.startswith(("job=", "tracking.", "cluster."))]
    return " ".join([job, *shown])[:250]


def prepare(cfg: dict[str, Any], cwd: str) -> None:
    """Make every path in the config absolute: workers run in other directories."""
    cfg["tracking"]["uri"] = preflight.resolve_tracking_uri(cfg["tracking"]["uri"], cwd)
    storage = cfg["cluster"]["storage_path"] or os.path.join("outputs", "ray")
    cfg["cluster"]["storage_path"] = os.path.abspath(os.path.join(cwd, storage))


def run_job(
    cfg: dict[str, Any],
    argv: list[str],
    overrides: list[str],
    started_at: float,
    resume_id: str | None = None,
) -> int:
    prepare(cfg, os.getcwd())
    tcfg, ccfg, trk = cfg["trainer"], cfg["cluster"], cfg["tracking"]
    name = cfg["job"]["name"]
    job = load_job(name)

    preflight.check_tracking(trk["uri"])
    for key in job.model_sources:
        preflight.check_model_source(f"job.{key}", cfg["job"][key], trk["uri"])
    preflight.check_cluster(ccfg["address"])
    if ccfg["address"] is None:  # know the embedded cluster's size before paying to start it
        embedded = launch.embedded_resources(ccfg)
        use_gpu = tcfg["use_gpu"] if tcfg["use_gpu"] is not None else embedded.gpus > 0
        launch.check_placeable(tcfg, use_gpu, embedded)
    print(
        f"Starting Ray ({'embedded, loopback only' if ccfg['address'] is None else ccfg['address']}) ...",
        flush=True,
    )
    tracking.import_in_background(trk["uri"])  # overlaps Ray's start
    resources = launch.connect(ccfg)
    try:
        use_gpu = tcfg["use_gpu"] if tcfg["use_gpu"] is not None else resources.gpus > 0
        launch.check_placeable(tcfg, use_gpu, resources)
        launch.check_storage_shared(ccfg["storage_path"])  # multi-node: before any MLflow run
        return _track_and_fit(cfg, job, argv, overrides, started_at, use_gpu, resume_id)
    finally:
        launch.shutdown()


def _run_dir(storage: str, name: str, run_id: str) -> str:
    """Where Ray Train keeps this run's checkpoints (a URI on cloud storage)."""
    return f"{storage.rstrip('/')}/{name}-{run_id}"


def _tracking_lost(uri: str, detail: str, resume_with: str) -> int:
    """Training finished and is checkpointed, but the tracking server is gone: say how to
    finish the run later instead of failing it (it stays RUNNING until then)."""
    print(
        f"\nerror: MLflow at {uri} is unreachable ({detail.splitlines()[0]}).\n"
        "Training finished and its checkpoints and undelivered metrics are kept.\n"
        f"When the server is back, finish the run with: {resume_with}",
        file=sys.stderr,
    )
    return 1


def deployed_weights(state: dict) -> dict:
    """The weights to log as the model: the EMA's when training kept one (trainer.ema_decay)."""
    if "ema" not in state:
        return state["model"]
    return {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}


def _track_and_fit(cfg, job, argv, overrides, started_at, use_gpu, resume_id) -> int:
    from orchestrator.mailbox import drain_while_alive  # imports Ray

    trk = cfg["tracking"]
    name = cfg["job"]["name"]
    storage = cfg["cluster"]["storage_path"]
    command = "orchestrate " + " ".join(shlex.quote(a) for a in argv)
    commit = tracking.git_commit(PROJECT_DIR)
    tags = {
        "job": name,
        "orchestrator.overrides": " ".join(overrides),
        "orchestrator.command": command,
        "mlflow.source.name": "orchestrate",
        "use_gpu": str(use_gpu),
        resume.DRIVER_TAG: resume.driver_tag(),  # a resume refuses while this process lives
    }
    # Set by `orchestrate-jobs submit`: how the submitting machine finds this run.
    if submission := os.environ.get("ORCHESTRATOR_SUBMISSION_ID"):
        tags["orchestrator.submission_id"] = submission
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if resume_id:  # the same run continues: its params and tags stay as first logged
        run_id = resume_id
        resume.reopen(cfg, run_id, _run_dir(storage, name, run_id))
        print(f"Resuming MLflow run {run_id} from its latest checkpoint", flush=True)
    else:
        run_id = tracking.create_run(
            trk["uri"],
            trk["experiment"],
            trk["run_name"] or _run_name(name, overrides),
            tracking.flatten(cfg),
            tags,
            tracking.config_yaml(cfg),
        )
        print(f"MLflow run {run_id} (experiment '{trk['experiment']}', {trk['uri']})", flush=True)
    resume_with = resume.command(run_id, overrides)
    run_dir = _run_dir(storage, name, run_id)
    # Workers keep small files beside the checkpoints (which rank is which process, metrics a
    # tracking outage left undelivered) when that storage is a file system.
    local_dir = None if "://" in run_dir else run_dir
    cfg = {**cfg, "launch": {"started_at": started_at, "run_dir": local_dir}}

    previous = _INTERRUPTS.install()
    display = ProgressDisplay(job.main_metric)
    # Rank 0's metrics reach MLflow through here (the workers hold no MLflow client).
    spill = os.path.join(local_dir, tracking.UNDELIVERED_METRICS) if local_dir else None
    receiver = tracking.MetricsReceiver(trk["uri"], run_id, spill)
    on_event = event_handler(receiver, display)

    t0 = time.monotonic()
    try:
        mailbox = launch.make_mailbox()
        # Built beside the workers as they start; kept for the final model (see _finish).
        shared = shared_data.start(cfg)
        thread, box = launch.fit_in_background(
            cfg, run_id, use_gpu, storage, f"{name}-{run_id}", mailbox, shared=shared
        )
        if trk["log_model"]:
            tracking.import_model_logging_in_background()
        drain_while_alive(mailbox, thread, on_event)
        if "error" in box:
            raise TrainingFailed(_describe(box["error"]))
        outcome = display.outcome or {}
        if outcome.get("status") != "finished":
            raise TrainingFailed(
                outcome.get("message") or "training ended without reporting an outcome"
            )
        if outcome.get("message", "").startswith("MLflow unreachable"):
            return _tracking_lost(trk["uri"], outcome["message"], resume_with)
        if not receiver.finish(trk["outage_wait_s"]):  # the server may be restarting
            return _tracking_lost(trk["uri"], f"undelivered metrics kept in {spill}", resume_with)
        try:
            _finish(cfg, job, run_id, box["result"], shared)
        except Exception as exc:
            if tracking.reachable(trk["uri"]):
                raise
            return _tracking_lost(trk["uri"], f"{type(exc).__name__}: {exc}", resume_with)
    except Interrupted as exc:
        _ignore_signals()
        launch.shutdown()  # stop the workers first: nothing may train or log after KILLED
        print(
            f"\n{exc} received: stopping workers; MLflow run {run_id} marked KILLED\n"
            f"Checkpoints are kept; continue with: {resume_with}",
            file=sys.stderr,
        )
        tracking.end_run(trk["uri"], run_id, "KILLED", f"stopped by {exc}")
        return 128 + exc.signum
    except TrainingFailed as exc:
        _ignore_signals()
        print(
            f"\nerror: training failed: {exc}\nMLflow run {run_id} marked FAILED\n"
            f"If the cause is fixed, continue from the last checkpoint with: {resume_with}",
            file=sys.stderr,
        )
        tracking.end_run(trk["uri"], run_id, "FAILED", str(exc))
        return 1
    except BaseException as exc:
        _ignore_signals()
        tracking.end_run(trk["uri"], run_id, "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        for s, handler in previous.items():  # SIG_IGN included: the final status is written
            signal.signal(s, handler)

    _summary(display, cfg, run_id, time.monotonic() - t0)
    return 0


def event_handler(receiver: tracking.MetricsReceiver, display: ProgressDisplay):
    """Rank 0's events: metrics to MLflow (shielded from Ctrl-C, see interrupts.py), the rest
    to the display."""

    def on_event(event: dict[str, Any]):
        if event["type"] not in receiver.KINDS:
            return display.handle(event)
        with _INTERRUPTS.shielded():
            return receiver.handle(event)

    return on_event


def _finish(cfg, job, run_id, result, shared) -> None:
    """Log the final model from the last checkpoint and mark the run FINISHED."""
    trk = cfg["tracking"]
    if not trk["log_model"] or result.checkpoint is None:
        tracking.end_run(trk["uri"], run_id, "FINISHED")
        return
    with result.checkpoint.as_directory() as path:
        log_final_model(cfg, job, run_id, path, shared)


def log_final_model(cfg, job, run_id: str, checkpoint_dir: str, shared=None) -> None:
    """Rebuild the job's model from a checkpoint, log (and register) it, mark the run FINISHED.

    `shared`: the refs of the data the run trained on (`shared_data.start`); the model is
    rebuilt from those splits when they can still be fetched, else from data built here."""
    import torch
    from torch.utils.data import DataLoader

    from orchestrator import checkpoint
    from orchestrator.job import job_config

    trk = cfg["tracking"]
    # As on the workers: a job may load `models:/name@alias` (fine-tuning) from this job's store.
    os.environ["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_REGISTRY_URI"] = trk["uri"]
    # Ray hands back its latest registered checkpoint, which a crash mid-copy may have damaged;
    # the newest intact one beside it is the model (as a resumed run's workers choose).
    state, used, problems = checkpoint.load_newest_intact(checkpoint_dir)
    if problems:
        print(f"final model from {used.name} (skipped {'; '.join(problems)})", flush=True)
    jcfg = job_config(job, cfg["job"])
    torch.manual_seed(cfg["seed"])
    splits = shared_data.kept_splits(shared)
    if splits is None:
        splits = job.build_data(jcfg)
    model = job.build_model(jcfg, splits)
    model.load_state_dict(deployed_weights(state))
    batch = next(iter(DataLoader(splits.val, batch_size=5)))
    if job.export is not None:
        model, example = job.export(model.eval(), batch)
    else:
        example = job.model_input(batch)
    model_uri, version = tracking.log_model_and_finish(
        trk["uri"], run_id, model, example, trk["register_as"], trk["alias"]
    )
    print(f"Model logged: {model_uri}", flush=True)
    if version:
        print(
            f"Registered: models:/{trk['register_as']}@{trk['alias']} (version {version})",
            flush=True,
        )


def _summary(display: ProgressDisplay, cfg, run_id: str, seconds: float) -> None:
    uri = cfg["tracking"]["uri"]
    print(f"\nFinished {cfg['job']['name']} in {seconds:.0f}s. MLflow run id: {run_id}")
    for key in sorted(display.last_metrics):
        if key.startswith("val/") or key == "train/loss_epoch":
            print(f"  {key:<20} {display.last_metrics[key]:.4f}")
    if uri.startswith("http"):
        print(f"Open the run: {uri.rstrip('/')}/#/experiments/0/runs/{run_id}")
    else:
        print(
            f"Open the MLflow UI: mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)"
        )


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Ray's TrainingFailedError carries the worker traceback; its last line is the cause.
    return lines[-1] if lines else type(error).__name__


def _ignore_signals() -> None:
    """A second Ctrl-C must not interrupt the cleanup that records the run's final status."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
