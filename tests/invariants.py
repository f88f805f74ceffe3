"""The promises every fault test checks, through MLflow's own client (issue #6).

Each check returns the violations it found instead of stopping at the first, so the
reliability report (`make reliability`) can count them; `assert_invariants` then fails the
test with all of them listed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

# Every violation seen in this pytest session, for the reliability summary (conftest.py).
VIOLATIONS: list[str] = []

# Wall-clock measurements differ between any two runs; everything else must match.
TIMING_KEYS = ("train/samples_per_s", "train/epoch_time_s", "startup/", "time/")
# Where and how hard to retry may differ between a disturbed run and its reference; what is
# trained may not.
CIRCUMSTANTIAL_PARAMS = ("tracking.", "cluster.", "trainer.max_failures")


@dataclass
class RunRecord:
    """What MLflow holds for one run: status, params, and every metric's (step, value)s."""

    run_id: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def record(client: MlflowClient, run_id: str) -> RunRecord:
    run = client.get_run(run_id)
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        for key in run.data.metrics
    }
    return RunRecord(run_id, run.info.status, run.data.params, run.data.tags, history)


def violations(
    runs: list, disturbed: RunRecord, reference: RunRecord | None, status: str = "FINISHED"
) -> list[str]:
    """All broken promises of `disturbed`, a run that went through faults, compared with
    `reference`, the same config trained undisturbed (None: only the run's own checks)."""
    found = []
    if len(runs) != 1:
        found.append(f"{len(runs)} MLflow runs for one job (expected exactly 1)")
    if disturbed.status != status:
        found.append(f"run status {disturbed.status}, expected {status}")
    for key, points in disturbed.history.items():
        repeated = sorted(s for s, n in Counter(s for s, _ in points).items() if n > 1)
        if repeated:
            found.append(f"{key}: steps logged more than once: {repeated[:5]}")
    if reference is None:
        return found
    for key, ref_points in reference.history.items():
        if status != "FINISHED":  # a failed run stops early: compare the prefix it reached
            last = max((s for s, _ in disturbed.history.get(key, [])), default=-1)
            ref_points = [(s, v) for s, v in ref_points if s <= last]
        got = dict(disturbed.history.get(key, []))
        missing = [s for s, _ in ref_points if s not in got]
        if missing:
            found.append(f"{key}: steps missing (gaps): {missing[:5]}")
            continue
        if key.startswith(TIMING_KEYS):
            continue
        for step, value in ref_points:
            if abs(got[step] - value) > 1e-6:
                found.append(
                    f"{key} at step {step}: {got[step]!r} differs from the undisturbed run's {value!r}"
                )
                break
    changed = [
        k
        for k, v in reference.params.items()
        if not k.startswith(CIRCUMSTANTIAL_PARAMS) and disturbed.params.get(k) != v
    ]
    if changed:
        found.append(f"params differ from the undisturbed run's: {changed[:5]}")
    return found


def assert_invariants(
    runs: list, disturbed: RunRecord, reference: RunRecord | None, status: str = "FINISHED"
) -> None:
    found = violations(runs, disturbed, reference, status)
    VIOLATIONS.extend(found)
    assert not found, "invariants violated:\n  " + "\n  ".join(found)


def assert_no_workers_left(train_workers, timeout: float = 60) -> None:
    """No Ray Train worker of the test cluster outlives the job (they may take a moment)."""
    import time

    deadline = time.monotonic() + timeout
    while train_workers() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [p.pid for p in train_workers()]
    if left:
        VIOLATIONS.append(f"Ray worker processes left behind: {left}")
    assert not left, f"Ray worker processes left behind: {left}"
