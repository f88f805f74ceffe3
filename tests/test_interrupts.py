"""Ctrl-C during a driver's MLflow writes is raised once they are done (orchestrator/
interrupts.py): real signals sent to this process, a real SQLite store read with MLflow's
client."""

from __future__ import annotations

import os
import signal
import time

import pytest

from orchestrator import tracking
from orchestrator.interrupts import DeferredInterrupts
from orchestrator.progress import ProgressDisplay
from orchestrator.runner import _INTERRUPTS as JOB_INTERRUPTS
from orchestrator.runner import Interrupted, event_handler
from orchestrator.sweep import _INTERRUPTS as SWEEP_INTERRUPTS
from tests.conftest import tracking_uri


def _interrupt_me() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)  # the handler runs in this (the main) thread meanwhile


def test_a_signal_inside_a_shielded_section_is_raised_at_its_end_and_outside_at_once():
    interrupts = DeferredInterrupts(Interrupted)
    previous = interrupts.install()
    done = []
    try:
        with pytest.raises(Interrupted) as raised:
            with interrupts.shielded():
                _interrupt_me()
                done.append("the writes")
        assert done == ["the writes"] and raised.value.signum == signal.SIGINT
        assert interrupts.pending is None
        with pytest.raises(Interrupted):
            _interrupt_me()
            time.sleep(5)
            done.append("not reached")
        assert done == ["the writes"]
    finally:
        interrupts.restore(previous)
    assert signal.getsignal(signal.SIGINT) is previous[signal.SIGINT]


def test_restore_leaves_a_handler_set_meanwhile_alone():
    interrupts = DeferredInterrupts(Interrupted)
    previous = interrupts.install()
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a driver does while writing KILLED
        interrupts.restore(previous)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        # Still ours, so put back (a check with `is` never matched: a bound method is a new
        # object at each access, and the handlers were never restored).
        assert signal.getsignal(signal.SIGTERM) is previous[signal.SIGTERM]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_the_sweep_driver_raises_keyboard_interrupt():
    previous = SWEEP_INTERRUPTS.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            with SWEEP_INTERRUPTS.shielded():
                _interrupt_me()
    finally:
        SWEEP_INTERRUPTS.restore(previous)


class _InterruptedReceiver(tracking.MetricsReceiver):
    """The driver's real receiver, with Ctrl-C pressed as each write begins."""

    def handle(self, event):
        _interrupt_me()
        return super().handle(event)


def test_ctrl_c_while_the_job_driver_logs_rank_0s_metrics_lets_the_write_and_killed_through(
    tmp_path,
):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("interrupted")).info.run_id
    on_event = event_handler(_InterruptedReceiver(uri, run_id, None), ProgressDisplay("val/acc"))
    rows = [["train/loss", step, 1.0 / step, 1_700_000_000_000 + step] for step in (1, 2, 3)]
    previous = signal.getsignal(signal.SIGINT)
    installed = JOB_INTERRUPTS.install()
    try:
        with pytest.raises(Interrupted):
            on_event({"type": "metrics", "tags": {}, "rows": rows})
    finally:
        JOB_INTERRUPTS.restore(installed)
    assert signal.getsignal(signal.SIGINT) is previous
    # The batch went in whole, and the driver's next write (the run's status) goes through.
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    tracking.end_run(uri, run_id, "KILLED", "stopped by SIGINT")
    assert client.get_run(run_id).info.status == "KILLED"
