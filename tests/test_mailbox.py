"""Rank 0's metrics travel to the driver through the mailbox, and only the driver talks to
MLflow: a real Ray head, a real task as rank 0, a real SQLite store read with MLflow's client.
This module imports no MLflow at its top: Ray runs `_rank0` by importing it."""

from __future__ import annotations

import uuid

from orchestrator.mailbox import Mailbox, drain, drain_while_alive, post_to
from orchestrator.tracking import MetricsReceiver
from tests.conftest import tracking_uri


def _rank0(mailbox, steps: list[int], tags: dict[str, str]):
    """What rank 0's loop does with its logger, in a worker process of its own."""
    import sys

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from orchestrator.tracking import RelayedMetricLogger

    out = RelayedMetricLogger(mailbox, tags)
    for step in steps:
        out.log({"train/loss": 1.0 / step}, step=step)
    figure = Figure()
    figure.add_subplot().plot([0, 1], [1, 0])
    out.log_image("curve", figure, epoch=steps[-1])
    out.log_text("note", f"up to step {steps[-1]}", epoch=steps[-1])
    delivered = out.flush()
    return delivered, "mlflow" in sys.modules


def _run_as_rank0(ray, mailbox, receiver, steps, tags):
    # A runtime env of its own: a fresh worker process, not one an earlier task warmed up.
    fresh = {"env_vars": {"ORCHESTRATOR_TEST_WORKER": uuid.uuid4().hex}}
    task = ray.remote(num_cpus=0, runtime_env=fresh)(_rank0).remote(mailbox, steps, tags)
    while not ray.wait([task], timeout=0)[0]:
        drain(mailbox, receiver.handle)
    drain(mailbox, receiver.handle, timeout=0.5)
    return ray.get(task)


def test_relayed_metrics_arrive_once_across_a_restart_and_rank0_imports_no_mlflow(
    tmp_path, ray_driver
):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("relay")).info.run_id
    spill = tmp_path / "undelivered_metrics.jsonl"
    receiver = MetricsReceiver(uri, run_id, str(spill))
    mailbox = Mailbox()

    first = _run_as_rank0(ray_driver, mailbox, receiver, [1, 2, 3], {"workers.num_nodes": "1"})
    assert first == (True, False)  # the driver took them; rank 0 never imported MLflow
    # A restarted rank 0 replays steps 2 and 3 (same values) and goes on with step 4.
    second = _run_as_rank0(ray_driver, mailbox, receiver, [2, 3, 4], {"workers.num_nodes": "2"})
    assert second == (True, False)
    assert receiver.finish(wait_s=0) is True

    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert history == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert client.get_run(run_id).data.tags["workers.num_nodes"] == "2"  # the latest placement
    png = client.download_artifacts(run_id, "curve/epoch_004.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    note = client.download_artifacts(run_id, "note/epoch_004.txt", str(tmp_path))
    assert open(note).read() == "up to step 4"
    assert not spill.exists()


def test_rank0_keeps_its_metrics_while_the_driver_does_not_answer(
    tmp_path, ray_driver, monkeypatch
):
    import threading

    from orchestrator import tracking

    monkeypatch.setattr(tracking, "RELAY_REPLY_TIMEOUT_S", 1.0)
    mailbox = Mailbox()
    out = tracking.RelayedMetricLogger(mailbox)
    out.log({"train/loss": 0.5}, step=7)
    assert out.flush() is False  # nobody drains the mailbox: no reply in time
    assert out.pending == {("train/loss", 7): (0.5, out.pending[("train/loss", 7)][1])}

    # The driver catches up (the unanswered batch is still in the mailbox) and rank 0 sends
    # the same batch again: it arrives, once.
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("late")).info.run_id
    receiver = MetricsReceiver(uri, run_id, spill_path=None)
    flushed: list[bool] = []
    sender = threading.Thread(target=lambda: flushed.append(out.flush()))
    sender.start()
    drain_while_alive(mailbox, sender, receiver.handle)
    assert flushed == [True] and not out.pending
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [
        (7, 0.5)
    ]


def test_a_named_inbox_takes_a_stop_from_another_process_and_is_gone_once_killed(ray_driver):
    """How a sweep's driver tells a stopped trial to end (sweep.stop_trial)."""
    import threading
    import time

    name = f"inbox-{uuid.uuid4().hex}"
    mailbox = Mailbox(name=name)
    post = ray_driver.remote(num_cpus=0)(post_to)  # from another process, as the sweep's driver
    assert ray_driver.get(post.remote(name, {"type": "stop"})) is True

    # The trial's drain stops as soon as it has the stop, though `fit` still runs.
    training = threading.Event()
    fit = threading.Thread(target=training.wait, args=(60,), daemon=True)
    fit.start()
    seen: list[str] = []
    started = time.monotonic()
    drain_while_alive(mailbox, fit, lambda e: seen.append(e["type"]), until=lambda: bool(seen))
    assert seen == ["stop"] and fit.is_alive() and time.monotonic() - started < 10
    training.set()

    ray_driver.kill(mailbox.actor)
    deadline = time.monotonic() + 20
    while ray_driver.get(post.remote(name, {"type": "stop"})) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_driver.get(post.remote(name, {"type": "stop"})) is False  # its name is free
