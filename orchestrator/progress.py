"""What the user sees while a job trains: their progress, not Ray's chatter.

On a terminal one status line updates in place (epoch, step, loss, main metric, samples/s,
ETA) and each finished epoch leaves a line behind; elsewhere (CI, log files, `ray job logs`)
only the epoch lines are printed.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProgressDisplay:
    def __init__(self, main_metric: str, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.main_metric = main_metric
        self.start = time.monotonic()
        self.best: float | None = None
        self.last_metrics: dict[str, float] = {}
        self.outcome: dict[str, Any] | None = None
        self.first_epoch: tuple[int, float] | None = None

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "step" and self.live:
            done = (event["epoch"] - 1) * event["steps_per_epoch"]
            frac = min(1.0, (event["step"] - done) / max(1, event["steps_per_epoch"]))
            self._status(
                f"epoch {event['epoch']}/{event['epochs']} {frac:4.0%}  step {event['step']}  "
                f"loss {event['loss']:.4f}  lr {event['lr']:.2e}"
            )
        elif kind == "epoch":
            m = event["metrics"]
            self.last_metrics = m
            now = time.monotonic()
            if self.first_epoch is None:  # time per epoch, measured after start-up
                self.first_epoch = (event["epoch"], now)
            done, since = event["epoch"] - self.first_epoch[0], now - self.first_epoch[1]
            per_epoch = since / done if done else now - self.start
            eta = per_epoch * (event["epochs"] - event["epoch"])
            main = m.get(self.main_metric)
            line = (
                f"epoch {event['epoch']:>3}/{event['epochs']}  train_loss {m['train/loss_epoch']:.4f}  "
                f"val_loss {m.get('val/loss', float('nan')):.4f}  "
                + (f"{self.main_metric} {main:.4f}  " if main is not None else "")
                + f"{m['train/samples_per_s']:.0f} samples/s  ETA {_fmt_eta(eta)}"
            )
            self._line(line)
        elif kind == "resumed":
            self._line(
                f"resumed from the checkpoint of epoch {event['epoch']} (step {event['step']}) "
                "after a worker failure"
            )
        elif kind == "outcome":
            self.outcome = event

    def _status(self, text: str) -> None:
        self.stream.write("\r\033[K" + text)
        self.stream.flush()

    def _line(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.live else "") + text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        self._line(text)


def drain(queue, display: ProgressDisplay, timeout: float = 0.25) -> None:
    """Hand every queued event to the display; wait up to `timeout` for the first."""
    from ray.util.queue import Empty

    try:
        display.handle(queue.get(timeout=timeout))
        while True:
            display.handle(queue.get_nowait())
    except Empty:
        pass
