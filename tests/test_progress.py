"""What a person sees: the single-run progress lines and the sweep's live trial table."""

from __future__ import annotations

import io

from orchestrator.progress import ProgressDisplay, SweepDisplay


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def epoch_event(epoch: int, acc: float) -> dict:
    metrics = {
        "train/loss_epoch": 0.5,
        "val/loss": 0.4,
        "val/acc": acc,
        "train/samples_per_s": 900.0,
    }
    return {"type": "epoch", "epoch": epoch, "epochs": 3, "step": 10 * epoch, "metrics": metrics}


def test_run_progress_in_a_log_is_one_line_per_epoch_without_control_codes():
    out = io.StringIO()
    display = ProgressDisplay("val/acc", out)
    display.handle(
        {
            "type": "step",
            "epoch": 1,
            "epochs": 3,
            "step": 5,
            "steps_per_epoch": 10,
            "loss": 1.0,
            "lr": 1e-3,
        }
    )
    for epoch in (1, 2):
        display.handle(epoch_event(epoch, 0.9 + epoch / 100))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\033" not in out.getvalue()
    assert lines[1].startswith("epoch   2/3") and "val/acc 0.9200" in lines[1] and "ETA" in lines[1]


def test_the_first_epochs_eta_leaves_the_start_up_out():
    out = io.StringIO()
    display = ProgressDisplay("val/acc", out)
    display.start -= 60  # Ray and the worker group took a minute to start
    first = epoch_event(1, 0.9)
    first["metrics"]["train/epoch_time_s"] = 0.5
    display.handle(first)
    # Two epochs to go at the first epoch's 0.5 s, not at the 60 s since the display started.
    assert out.getvalue().rstrip().endswith("ETA 1s"), out.getvalue()


def test_run_progress_on_a_terminal_updates_a_status_line_in_place():
    out = Terminal()
    display = ProgressDisplay("val/acc", out)
    display.handle(
        {
            "type": "step",
            "epoch": 1,
            "epochs": 3,
            "step": 5,
            "steps_per_epoch": 10,
            "loss": 1.0,
            "lr": 1e-3,
        }
    )
    assert out.getvalue().startswith("\r\033[K") and "epoch 1/3" in out.getvalue()
    assert "\n" not in out.getvalue()  # a status line, not a log line


def test_sweep_table_in_a_log_prints_each_trial_start_and_end_once():
    out = io.StringIO()
    table = SweepDisplay("val/acc", "max", out)
    table.started("t1", {"optim.lr": 0.00312, "trainer.batch_size": 64})
    table.started("t2", {"optim.lr": 0.1, "trainer.batch_size": 32})
    for epoch, acc in [(1, 0.80), (2, 0.95), (3, 0.93)]:
        table.result("t1", epoch, acc)
    table.result("t2", 1, 0.30)
    table.ended("t2", "FINISHED", early_stopped=True)
    table.ended("t1", "FINISHED")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "\033" not in out.getvalue()
    assert lines[0].startswith("trial t1") and "optim.lr=0.00312 trainer.batch_size=64" in lines[0]
    assert "STOPPED (early, epoch 1)" in lines[2] and "best val/acc 0.3000" in lines[2]
    assert "FINISHED" in lines[3] and "epoch   3" in lines[3] and "best val/acc 0.9500" in lines[3]


def test_sweep_table_on_a_terminal_redraws_in_place_with_the_best_so_far():
    out = Terminal()
    table = SweepDisplay("val/loss", "min", out)
    table.started("t1", {"optim.lr": 0.01})
    table.started("t2", {"optim.lr": 0.001})
    table.result("t2", 1, 0.25)
    table.ended("t2", "FINISHED")
    frames = out.getvalue().split("\033[")
    assert "2F" in out.getvalue()  # moved up over the previous two-line table
    last = out.getvalue().rsplit("\033[J", 1)[1].splitlines()
    assert last[0] == "trials: 2 started, 1 ended; best val/loss 0.2500"
    assert len(last) == 3 and last[2].startswith("t2") and "FINISHED" in last[2]
    assert len(frames) > 2
