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
            # Until a second epoch ends: the first one's training time (the time since this
            # display started includes Ray's start-up, ~20 epochs' worth for cnn_digits).
            per_epoch = since / done if done else m.get("train/epoch_time_s", now - self.start)
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
                f"resumed from the checkpoint of epoch {event['epoch']} (step {event['step']})"
                + (f" ({event['note']})" if event.get("note") else "")
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


def _fmt_value(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class SweepDisplay:
    """The live trial table of a sweep: trial, params, status, epochs, best metric so far.

    On a terminal the table is redrawn in place (at most once a second, and at every trial's
    start and end); elsewhere each trial's start and end is one plain line, so CI logs and
    `ray job logs` stay readable.
    """

    def __init__(self, metric: str, mode: str, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.metric, self.mode = metric, mode
        self.trials: dict[str, dict[str, Any]] = {}
        self.drawn_lines = 0
        self.last_draw = 0.0

    def _better(self, a: float, b: float | None) -> bool:
        return b is None or (a > b if self.mode == "max" else a < b)

    def _row(self, trial: str) -> dict[str, Any]:
        """The trial's row; a trial first seen mid-sweep (e.g. after a resume) gets one too."""
        return self.trials.setdefault(
            trial, {"params": {}, "status": "RUNNING", "epoch": 0, "best": None}
        )

    def started(self, trial: str, params: dict[str, Any]) -> None:
        self.trials[trial] = {"params": params, "status": "RUNNING", "epoch": 0, "best": None}
        self._show(trial, force=True)

    def result(self, trial: str, epoch: int, value: float | None) -> None:
        row = self._row(trial)
        row["epoch"] = max(row["epoch"], epoch)
        if value is not None and self._better(value, row["best"]):
            row["best"] = value
        if self.live:
            self._draw()

    def ended(
        self, trial: str, status: str, early_stopped: bool = False, epochs: int | None = None
    ) -> None:
        """`epochs`: how many the trial's run logged, when known (it can exceed its last result)."""
        row = self._row(trial)
        row["status"] = "STOPPED" if early_stopped else status
        row["epoch"] = epochs if epochs is not None else row["epoch"]
        self._show(trial, force=True)

    def row_text(self, trial: str) -> str:
        row = self.trials[trial]
        best = f"{row['best']:.4f}" if row["best"] is not None else "-"
        params = " ".join(f"{k}={_fmt_value(v)}" for k, v in row["params"].items())
        status = row["status"]
        if status == "STOPPED":
            status = f"STOPPED (early, epoch {row['epoch']})"
        return f"{trial:<12} {status:<24} epoch {row['epoch']:>3}  best {self.metric} {best:<7} {params}"

    def _show(self, trial: str, force: bool) -> None:
        if self.live:
            self._draw(force)
        else:
            self.stream.write(f"trial {self.row_text(trial)}\n")
            self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_draw < 1.0:
            return
        self.last_draw = now
        done = sum(r["status"] != "RUNNING" for r in self.trials.values())
        values = [r["best"] for r in self.trials.values() if r["best"] is not None]
        best = (max if self.mode == "max" else min)(values) if values else None
        header = f"trials: {len(self.trials)} started, {done} ended; best {self.metric} " + (
            f"{best:.4f}" if best is not None else "-"
        )
        lines = [header, *(self.row_text(t) for t in self.trials)]
        # Move up over the previous table and clear below it, then redraw.
        up = f"\033[{self.drawn_lines}F\033[J" if self.drawn_lines else ""
        self.stream.write(up + "\n".join(lines) + "\n")
        self.stream.flush()
        self.drawn_lines = len(lines)
