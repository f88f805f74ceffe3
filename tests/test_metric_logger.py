"""Rank 0's MetricLogger against a real MLflow store (SQLite), and an unreachable server."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from orchestrator.tracking import MetricLogger
from tests.conftest import _free_port, tracking_uri


def _new_run(uri: str) -> str:
    client = MlflowClient(uri)
    experiment = client.create_experiment("logger")
    return client.create_run(experiment).info.run_id


def test_metrics_and_tags_arrive_with_the_first_flush_and_a_restart_never_duplicates(tmp_path):
    uri = tracking_uri(tmp_path)
    run_id = _new_run(uri)
    first = MetricLogger(uri, run_id, tags={"workers.num_nodes": "1"})
    for step in (1, 2, 3):
        first.log({"train/loss": 1.0 / step}, step=step)
    assert first.flush() is True

    # A restarted rank 0 replays steps 2 and 3 (same values) and goes on with step 4.
    second = MetricLogger(uri, run_id, tags={"workers.num_nodes": "2"})
    for step in (2, 3, 4):
        second.log({"train/loss": 1.0 / step}, step=step)
    assert second.flush() is True

    client = MlflowClient(uri)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert history == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert client.get_run(run_id).data.tags["workers.num_nodes"] == "2"  # the latest placement


def test_a_server_down_at_start_keeps_the_metrics_on_disk_and_does_not_raise(tmp_path):
    spill = tmp_path / "undelivered_metrics.jsonl"
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    logger = MetricLogger(dead, "0" * 32, spill_path=str(spill), tags={"a": "b"})
    logger.log({"train/loss": 0.5}, step=7)
    assert logger.flush() is False
    rows = [json.loads(line) for line in spill.read_text().splitlines()]
    assert [(r["key"], r["step"], r["value"]) for r in rows] == [("train/loss", 7, 0.5)]
