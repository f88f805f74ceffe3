"""The MLflow side: the piece Ray Train V2 does not have.

One training job is exactly one MLflow run. The driver creates it (so a bad config never
leaves a run behind and several workers never race to create one), logs params, tags and the
resolved config, and hands the run id to the workers. Rank 0 logs metrics with explicit steps
through a `RelayedMetricLogger`: they travel to the driver (mailbox.py), whose
`MetricsReceiver` sends them to that run id with a `MetricLogger` — workers hold no MLflow
client. Other ranks get a `NullMetricLogger`; a loop run without Ray logs with a
`MetricLogger` directly. When training ends, the driver logs the final model and sets the
terminal status.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PARAM_BATCH = 100  # MLflow's per-request limit for params
METRIC_BATCH = 1000  # ... and for metrics
MAX_PARAM_VALUE = 6000
# MLflow's HTTP client retries a refused request 7 times with exponential backoff (minutes);
# metric logging must not stall training on an outage, so it fails fast and buffers instead.
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# Beside the run's checkpoints: metrics a tracking outage left undelivered (JSON lines).
UNDELIVERED_METRICS = "undelivered_metrics.jsonl"
# How long rank 0 waits for the driver to take its metrics (the driver answers within a
# request's time to MLflow, 10 s at most when the server is down).
RELAY_REPLY_TIMEOUT_S = 300.0


@contextmanager
def _fail_fast(uri: str) -> Iterator[None]:
    """FAIL_FAST_HTTP for the metric logger's own requests only (MLflow reads these variables
    per request): the driver's other calls, such as logging the model, keep MLflow's retries.
    A value the user set wins."""
    if not uri.startswith(("http://", "https://")):
        yield
        return
    added = {k: v for k, v in FAIL_FAST_HTTP.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"trainer": {"lr": 1}} -> {"trainer.lr": "1"}; values truncated to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_VALUE]
    return flat


def git_commit(repo_dir: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo_dir), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def import_in_background(uri: str) -> None:
    """Import MLflow (seconds) in a thread while the caller waits on something else, such as Ray
    starting. Modules only: nothing is created in the store, so a run refused later leaves
    nothing behind."""
    modules = ["mlflow.tracking", "mlflow.entities"]
    if uri.startswith("sqlite:"):
        modules.append("mlflow.store.tracking.sqlalchemy_store")
    _import_in_thread(modules, "import-mlflow")


def import_model_logging_in_background() -> None:
    """Import what logging the final model needs while the workers train, instead of after
    training, on the way to the run's end: MLflow's PyTorch flavor, and the module behind
    `torch.export.export`, which that flavor saves the model with (imported on the first
    call; ~1.5-2 s here, most of it torch._dynamo)."""
    _import_in_thread(["mlflow.pytorch", "torch.export._trace"], "import-model-logging")


def _import_in_thread(modules: list[str], name: str) -> None:
    import importlib

    def load() -> None:
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError:  # only a head start: the real import reports any problem
                return

    threading.Thread(target=load, name=name, daemon=True).start()


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)  # models live beside their runs


def describe(tags: dict[str, str]) -> str:
    """The run's description in the MLflow UI: how to reproduce it."""
    lines = []
    if command := tags.get("orchestrator.command"):
        lines.append(f"Reproduce with:\n\n    {command}")
    if commit := tags.get("mlflow.source.git.commit"):
        lines.append(f"at git commit {commit}")
    return "\n\n".join(lines)


def create_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, str],
    tags: dict[str, str],
    config_yaml: str,
) -> str:
    """Create the job's run (experiment too, if new) and log what describes it. Returns its id."""
    from mlflow.entities import Param, RunTag

    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(experiment)
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), PARAM_BATCH):
        c.log_batch(run_id, params=items[i : i + PARAM_BATCH])
    c.log_text(run_id, config_yaml, "config.yaml")
    c.log_batch(run_id, tags=[RunTag("mlflow.note.content", describe(tags))])
    return run_id


def find_child_run(c, parent_id: str, trial_id: str):
    experiment_id = c.get_run(parent_id).info.experiment_id
    found = c.search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent_id}' and tags.`orchestrator.trial_id` = '{trial_id}'",
    )
    return found[0] if found else None


def child_run(
    uri: str,
    experiment_id: str,
    parent_id: str,
    trial_id: str,
    trial_params: dict[str, Any],
    params: dict[str, str],
    config_yaml: str,
) -> str:
    """The trial's child run: reused if this trial already has one (a resumed sweep), so no
    trial ever gets two runs. Params are the trial's own, so they never conflict."""
    from mlflow.entities import Param

    c = client(uri)
    existing = find_child_run(c, parent_id, trial_id)
    if existing is not None:
        c.set_terminated(existing.info.run_id, "RUNNING")
        return existing.info.run_id
    shown = " ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial_params.items()
    )
    run = c.create_run(
        experiment_id,
        run_name=f"trial {trial_id}: {shown}"[:250],
        tags={"mlflow.parentRunId": parent_id, "orchestrator.trial_id": trial_id},
    )
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), PARAM_BATCH):
        c.log_batch(run.info.run_id, params=items[i : i + PARAM_BATCH])
    c.log_text(run.info.run_id, config_yaml, "config.yaml")
    return run.info.run_id


def reachable(uri: str) -> bool:
    """Whether the tracking store answers now (a quick check, no retries)."""
    if not uri.startswith(("http://", "https://")):
        return True  # a database file or server: its errors are not outages we wait out
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True  # something answered
    except OSError:
        return False


def end_run(uri: str, run_id: str, status: str, error: str | None = None) -> None:
    """Set FINISHED / FAILED / KILLED. Never raises: this runs on the way out of failures."""
    try:
        c = client(uri)
        if error:
            c.set_tag(run_id, "error", error[:5000])
        c.set_terminated(run_id, status)
    except Exception as exc:  # the run stays RUNNING; say so loudly rather than crash twice
        log.error("could not mark MLflow run %s as %s: %s", run_id, status, exc)


def log_metrics_now(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client(uri).log_batch(
        run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
    )


def log_model_and_finish(
    uri: str, run_id: str, model, input_example, register_as: str | None, alias: str
) -> tuple[str, str | None]:
    """Log the trained model (signature, input example), register it under an alias, and mark
    the run FINISHED — or FAILED, if logging or registering raises."""
    import mlflow
    import mlflow.pytorch
    import numpy
    import torch
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(uri)
    # The model is registered beside its run, whatever MLFLOW_REGISTRY_URI the shell has.
    mlflow.set_registry_uri(uri)
    model = model.cpu().eval()
    with torch.no_grad():
        output = model(input_example)
    example = input_example.numpy()
    # Explicit requirements: MLflow's inference of them loads the model in a subprocess.
    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"mlflow=={mlflow.__version__}",
        f"numpy=={numpy.__version__}",
    ]
    version = None
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(example, output.numpy()),
            input_example=example,
            registered_model_name=register_as,
            pip_requirements=requirements,
        )
        if register_as:
            version = str(info.registered_model_version)
            client(uri).set_registered_model_alias(register_as, alias, version)
    return info.model_uri, version


class NullMetricLogger:
    """For ranks other than 0, and for runs that don't track. Keeps artifact names for tests."""

    def __init__(self) -> None:
        self.artifacts: list[str] = []

    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        pass

    def flush(self) -> bool:
        return True

    def log_image(self, name: str, image: Any, epoch: int) -> None:
        self.artifacts.append(f"{name}/epoch_{epoch:03d}.png")

    def log_text(self, name: str, text: str, epoch: int) -> None:
        self.artifacts.append(f"{name}/epoch_{epoch:03d}.txt")


class MetricLogger:
    """Buffers metrics and sends them in batches; never loses one, never sends one twice. The
    driver's `MetricsReceiver` holds one for rank 0's metrics (a loop run without Ray, its own).

    - Start-up: the MLflow client is made in a background thread (importing mlflow takes
      seconds where it is not yet imported). Nothing is sent before the first `flush`.
    - Restarts: after a worker-group restart the loop replays from the latest checkpoint. Steps
      already delivered (by this logger, or by an earlier one: read from the store when it
      connects) are skipped (the replay is deterministic, so the values are the same), which
      keeps every metric step present exactly once.
    - Tracking-server outages: a flush that fails keeps the metrics and also writes them to
      `spill_path` (on the run's checkpoint storage), so a later flush — or, if the server
      never comes back in time, `orchestrate resume=<run id>` later — delivers them. Nothing
      waits on the server: HTTP requests fail fast instead of retrying for minutes. A server
      that is down at the start is just the first failed flush.
    """

    def __init__(
        self,
        uri: str,
        run_id: str,
        spill_path: str | None = None,
        tags: dict[str, str] | None = None,
    ):
        self.uri, self.run_id = uri, run_id
        self.spill_path = Path(spill_path) if spill_path else None
        self.tags = dict(tags or {})  # sent with the first successful flush
        # (key, step) -> (value, timestamp ms): a step replayed after a restart replaces it.
        self.pending: dict[tuple[str, int], tuple[float, int]] = {}
        for name, number, timestamp, step in self._read_spill():
            self.pending[(name, step)] = (number, timestamp)
        self.client: Any = None
        self.delivered: dict[str, int] = {}
        self._connecting = threading.Thread(
            target=self._connect, name="mlflow-connect", daemon=True
        )
        self._connecting.start()

    def _connect(self) -> None:
        """Make the client and learn which steps an earlier attempt already delivered."""
        try:
            with _fail_fast(self.uri):
                c = client(self.uri)
                latest = c.get_run(self.run_id).data.metrics
                self.delivered = {
                    key: max(m.step for m in c.get_metric_history(self.run_id, key))
                    for key in latest
                }
            self.client = c
        except Exception as exc:  # the server is down: the next flush tries again
            log.warning("MLflow unreachable at start, metrics kept for later: %s", _first_line(exc))

    def _connected(self) -> bool:
        self._connecting.join()
        if self.client is None:
            self._connect()
        return self.client is not None

    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        now = timestamp_ms or int(time.time() * 1000)
        for key, value in metrics.items():
            self.pending[(key, step)] = (float(value), now)

    # Artifacts have fixed names per epoch, so a replay after a restart overwrites, never adds.
    def log_image(self, name: str, image: Any, epoch: int) -> None:
        """`image`: a matplotlib figure, an array MLflow takes, or PNG bytes (relayed)."""
        file = f"epoch_{epoch:03d}.png"
        try:
            if not self._connected():
                raise ConnectionError("no MLflow client")
            with _fail_fast(self.uri):
                if isinstance(image, bytes):
                    with tempfile.TemporaryDirectory() as folder:
                        (Path(folder) / file).write_bytes(image)
                        self.client.log_artifact(self.run_id, str(Path(folder) / file), name)
                elif hasattr(image, "savefig"):  # a matplotlib figure
                    self.client.log_figure(self.run_id, image, f"{name}/{file}")
                else:
                    self.client.log_image(self.run_id, image, artifact_file=f"{name}/{file}")
        except Exception as exc:
            log.warning("could not log image %s: %s", name, exc)

    def log_text(self, name: str, text: str, epoch: int) -> None:
        try:
            if not self._connected():
                raise ConnectionError("no MLflow client")
            with _fail_fast(self.uri):
                self.client.log_text(self.run_id, text, f"{name}/epoch_{epoch:03d}.txt")
        except Exception as exc:
            log.warning("could not log text %s: %s", name, exc)

    def flush(self) -> bool:
        """Send what is pending, in step order. On failure keep it (in memory and in the spill
        file) for the next flush. Returns whether everything has been delivered."""
        from mlflow.entities import Metric, RunTag

        if not self._connected():
            self._write_spill()
            return False
        for key, step in [k for k in self.pending if k[1] <= self.delivered.get(k[0], -1)]:
            del self.pending[(key, step)]  # delivered by an attempt before a restart
        batch = sorted(self.pending.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        chunks = [batch[i : i + METRIC_BATCH] for i in range(0, len(batch), METRIC_BATCH)]
        for chunk in chunks or ([[]] if self.tags else []):  # tags go with the first batch
            tags = [RunTag(k, v) for k, v in self.tags.items()]
            try:
                with _fail_fast(self.uri):
                    self.client.log_batch(
                        self.run_id,
                        metrics=[
                            Metric(key, value, ts, step) for (key, step), (value, ts) in chunk
                        ],
                        tags=tags,
                    )
            except Exception as exc:
                log.warning(
                    "MLflow unreachable, keeping %d metrics for later: %s",
                    len(self.pending),
                    _first_line(exc),
                )
                self._write_spill()
                return False
            self.tags = {}
            for (key, step), _ in chunk:
                self.delivered[key] = max(self.delivered.get(key, -1), step)
                del self.pending[(key, step)]
        if self.spill_path is not None:
            self.spill_path.unlink(missing_ok=True)
        return True

    def _write_spill(self) -> None:
        if self.spill_path is None:
            return
        lines = [
            json.dumps({"key": key, "value": value, "timestamp": ts, "step": step})
            for (key, step), (value, ts) in self.pending.items()
        ]
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.spill_path.with_name(self.spill_path.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.spill_path)  # atomic: a crash mid-write keeps the previous file

    def _read_spill(self) -> list[tuple[str, float, int, int]]:
        if self.spill_path is None or not self.spill_path.exists():
            return []
        rows = [json.loads(line) for line in self.spill_path.read_text().splitlines() if line]
        return [(r["key"], r["value"], r["timestamp"], r["step"]) for r in rows]


class RelayedMetricLogger:
    """Rank 0's logger under Ray: buffers metrics like `MetricLogger`, and at each `flush`
    hands them to the driver through the mailbox and waits for its reply. Once the reply is
    in, the metrics are the driver's to deliver (or to keep on disk through an outage), so
    rank 0 may report the checkpoint that follows them. No MLflow import here."""

    def __init__(self, mailbox: Any, tags: dict[str, str] | None = None):
        self.mailbox = mailbox
        self.tags = dict(tags or {})  # sent with the next flush
        self.pending: dict[tuple[str, int], tuple[float, int]] = {}

    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        now = timestamp_ms or int(time.time() * 1000)
        for key, value in metrics.items():
            self.pending[(key, step)] = (float(value), now)

    def flush(self) -> bool:
        """Whether the driver took everything pending (kept for the next flush if not)."""
        rows = [(key, step, value, ts) for (key, step), (value, ts) in self.pending.items()]
        try:
            self.mailbox.request(
                {"type": "metrics", "rows": rows, "tags": self.tags}, RELAY_REPLY_TIMEOUT_S
            )
        except Exception as exc:  # the driver is gone or stuck: keep them, try again later
            log.warning("the driver did not take %d metrics: %s", len(rows), _first_line(exc))
            return False
        self.pending.clear()
        self.tags = {}
        return True

    def log_image(self, name: str, image: Any, epoch: int) -> None:
        if hasattr(image, "savefig"):  # a figure travels as the PNG MLflow would have stored
            buffer = io.BytesIO()
            image.savefig(buffer, format="png")
            image = buffer.getvalue()
        self._artifact({"kind": "image", "name": name, "data": image, "epoch": epoch})

    def log_text(self, name: str, text: str, epoch: int) -> None:
        self._artifact({"kind": "text", "name": name, "data": text, "epoch": epoch})

    def _artifact(self, event: dict[str, Any]) -> None:
        try:
            self.mailbox.send({"type": "artifact", **event})
        except Exception as exc:  # an artifact is a view of the run, not worth a stall
            log.warning("could not send %s to the driver: %s", event["name"], _first_line(exc))


class MetricsReceiver:
    """The driver's end of rank 0's metrics: one `MetricLogger` for the whole job, across
    worker-group restarts, so a replayed step is recognised as already delivered."""

    KINDS = ("metrics", "artifact")

    def __init__(self, uri: str, run_id: str, spill_path: str | None):
        self.logger = MetricLogger(uri, run_id, spill_path=spill_path)

    def handle(self, event: dict[str, Any]) -> None:
        """Log a relayed batch (flushed at once: delivered, or kept through an outage) or
        artifact. Rank 0's reply is just that the driver has it."""
        if event["type"] == "metrics":
            self.logger.tags.update(event["tags"])
            for key, step, value, ts in event["rows"]:
                self.logger.log({key: value}, step=step, timestamp_ms=ts)
            self.logger.flush()
        elif event["kind"] == "image":
            self.logger.log_image(event["name"], event["data"], event["epoch"])
        else:
            self.logger.log_text(event["name"], event["data"], event["epoch"])

    def finish(self, wait_s: float) -> bool:
        """After training: deliver what an outage held back, waiting up to `wait_s` for the
        server. Returns whether everything is in MLflow (if not, it is in the spill file)."""
        give_up_at = time.monotonic() + wait_s
        while not self.logger.flush() and time.monotonic() < give_up_at:
            time.sleep(2)  # the server may be restarting
        return not self.logger.pending


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def config_yaml(cfg: dict[str, Any]) -> str:
    import yaml

    out = io.StringIO()
    yaml.safe_dump(cfg, out, sort_keys=False)
    return out.getvalue()
