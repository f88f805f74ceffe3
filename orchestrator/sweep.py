"""Sweeps: Hydra's sweep grammar becomes a Ray Tune search; each trial is a full DDP job.

    orchestrate -m job=cnn_digits optim.lr='tag(log,interval(1e-4,1e-1))' \\
        optim.weight_decay=0,1e-4,1e-3 trainer.batch_size='choice(32,64,128)' \\
        sweep.num_samples=16 sweep.scheduler=asha
    orchestrate -m sweep.resume=<parent run id>     # continue an interrupted sweep

Grammar: `a,b,c` and `choice(a,b)` are categorical (enumerated when sweep.search=grid),
`range(a,b)` integer choices, `interval(a,b)` uniform, `tag(log,interval(a,b))` log-uniform.
A config group can be swept too (`optim=adamw,sgd`); the job cannot.

MLflow: one parent run (space, search, scheduler, best trial, a summary table) and one child
run per trial (`mlflow.parentRunId`) with the trial's own params and curves; trials stopped
by the scheduler are tagged `early_stopped` with the epoch. Trials run the same loop through
the same `launch.fit` as single jobs. Trial drivers hold no CPU (only a little memory), so
on a small cluster they never take the slots their own Train workers need.
"""

from __future__ import annotations

import csv
import io
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from orchestrator import launch, preflight, tracking
from orchestrator.errors import TrainingFailed, UserError
from orchestrator.interrupts import DeferredInterrupts

TRIAL_DRIVER_RESOURCES: dict[str, float] = {
    "cpu": 0,
    "memory": 64 * 1024**2,
}  # Tune needs a non-empty request


@dataclass(frozen=True)
class Dimension:
    key: str
    kind: str  # "choice" | "uniform" | "loguniform"
    values: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    group: bool = False  # a config group (optim=adamw,sgd) rather than a key

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice({', '.join(map(str, self.values))})"
        return f"{self.kind}({self.low:g}, {self.high:g})"

    def to_tune(self, grid: bool):
        from ray import tune

        if self.kind == "choice":
            return tune.grid_search(list(self.values)) if grid else tune.choice(list(self.values))
        if grid:
            raise UserError(
                self.key,
                f"grid search cannot enumerate {self.describe()}",
                "use a list or choice(...), or sweep.search=random|optuna",
            )
        return (tune.loguniform if self.kind == "loguniform" else tune.uniform)(self.low, self.high)


def split_overrides(overrides: list[str], groups: list[str]) -> tuple[list[str], list[Dimension]]:
    """Separate plain overrides from sweep dimensions, rejecting empty or inverted ranges."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from orchestrator.cli import _parse

    fixed: list[str] = []
    dims: list[Dimension] = []
    for raw, o in zip(overrides, _parse(OverridesParser.create(), overrides), strict=True):
        if not o.is_sweep_override():
            fixed.append(raw)
            continue
        key = o.key_or_group
        if key == "job":
            raise UserError("job", "a sweep cannot change the job", "run one sweep per job")
        if o.is_interval_sweep():
            v = o.value()
            log = "log" in v.tags
            if not v.start < v.end:
                raise UserError(
                    key,
                    f"interval({v.start:g}, {v.end:g}) is empty or inverted",
                    "write interval(low,high) with low < high",
                )
            if log and v.start <= 0:
                raise UserError(
                    key,
                    "a log interval needs a positive lower bound",
                    "e.g. tag(log,interval(1e-4,1e-1))",
                )
            dims.append(Dimension(key, "loguniform" if log else "uniform", low=v.start, high=v.end))
        else:
            values = tuple(o.sweep_iterator())
            if not values:
                raise UserError(
                    key, "the sweep has no values", "give at least one value, e.g. choice(1,2)"
                )
            dims.append(Dimension(key, "choice", values=values, group=key in groups))
    return fixed, dims


def with_config_space(
    base: dict[str, Any], dims: list[Dimension], groups: list[str]
) -> list[Dimension]:
    """The space from `sweep.params` (conf/sweep/*.yaml), with the command line's dimensions
    added or replacing those of the same key."""
    given = {d.key for d in dims}
    from_config = [f"{k}={v}" for k, v in base["sweep"]["params"].items() if k not in given]
    return [*split_overrides(from_config, groups)[1], *dims]


def _set(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    if isinstance(node.get(last), float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # `optim.weight_decay=0,1e-4` parses 0 as int
    node[last] = value


def trial_config(
    base: dict[str, Any], group_options: dict[str, dict[str, Any]], params: dict[str, Any]
):
    """The trial's resolved config: base, then swept group options, then swept keys."""
    import copy

    cfg = copy.deepcopy(base)
    for key, value in params.items():
        if key in group_options:
            cfg[key] = copy.deepcopy(group_options[key][str(value)])
    for key, value in params.items():
        if key not in group_options:
            _set(cfg, key, value)
    return cfg


def _validate_space(fixed: list[str], dims: list[Dimension]) -> dict[str, dict[str, Any]]:
    """Compose every categorical value and both ends of every interval on the driver, so a bad
    value fails here (exit 2) and not in trial 11. Returns the composed swept group options."""
    from orchestrator.cli import compose_config

    group_options: dict[str, dict[str, Any]] = {}
    for d in dims:
        probes = d.values if d.kind == "choice" else (d.low, d.high)
        for value in probes:
            cfg = compose_config([*fixed, f"{d.key}={value}"])
            if d.group:
                group_options.setdefault(d.key, {})[str(value)] = cfg[d.key]
    return group_options


def _trial(
    params: dict[str, Any],
    *,
    base,
    group_options,
    parent_id,
    experiment_id,
    sweep_name,
    use_gpu,
    shared,
):
    """One Tune trial: one child MLflow run and one Ray Train run of the shared loop.
    `shared`: the sweep's data refs when every trial trains on the same data, else None.

    Tune runs trials one after another in the same process (`reuse_actors`), and waits for this
    function to return before it hands the process to the next trial. A trial the scheduler
    stops is told so by the sweep's driver, through this trial's inbox (`stop_trial`): it ends
    its Train run and returns, leaving its run to the driver, which closed it already."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.config import validate
    from orchestrator.mailbox import drain_while_alive

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, group_options, params)
    validate(cfg)
    uri = cfg["tracking"]["uri"]
    # How long Tune waits for this function to return before the next trial may have the
    # process (2 s by default; a failed handover fails the next trial): time to deliver
    # metrics held back by a tracking outage, and to end the run.
    os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = str(int(cfg["tracking"]["outage_wait_s"]) + 60)
    run_id = tracking.child_run(
        uri,
        experiment_id,
        parent_id,
        trial_id,
        params,
        tracking.flatten(cfg),
        tracking.config_yaml(cfg),
    )
    # Rank 0's metrics reach the child run through this trial's driver, as in `orchestrate`.
    receiver = tracking.MetricsReceiver(uri, run_id, spill_path=None)
    outcome: dict[str, Any] = {}
    stopped = False

    def on_event(event: dict[str, Any]):
        nonlocal outcome, stopped
        stopped = stopped or event["type"] == _STOP
        if stopped:  # the driver closed the run: nothing more goes into it
            return None
        if event["type"] in receiver.KINDS:
            return receiver.handle(event)
        outcome = event if event["type"] == "outcome" else outcome

    mailbox = launch.make_mailbox(_inbox_name(sweep_name, trial_id))
    try:
        thread, box = launch.fit_in_background(
            cfg,
            run_id,
            use_gpu,
            cfg["cluster"]["storage_path"],
            f"{sweep_name}-{trial_id}",
            mailbox,
            callbacks=[TuneReportCallback()],  # made here: it needs this trial's Tune session
            shared=shared,
        )
        drain_while_alive(mailbox, thread, on_event, until=lambda: stopped)
        if stopped:
            launch.end_train_run(thread, box)
            return
    finally:
        ray.kill(mailbox.actor)  # frees its name; this process runs the next trial
    if "error" in box:
        raise box["error"]
    receiver.finish(cfg["tracking"]["outage_wait_s"])
    if outcome.get("status") != "finished":
        message = outcome.get("message") or "training ended without an outcome"
        tracking.end_run(uri, run_id, "FAILED", message)
        raise TrainingFailed(message)
    tracking.end_run(uri, run_id, "FINISHED")


_STOP = "stop"  # the event a stopped trial's inbox gets from the sweep's driver


def _inbox_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}-inbox"


def stop_trial(sweep_name: str, trial_id: str) -> None:
    """Tell a trial the scheduler stopped that it is over (Tune keeps its process for the next
    trial instead of killing it). A no-op once the trial's function has returned."""
    from orchestrator.mailbox import post_to

    post_to(_inbox_name(sweep_name, trial_id), {"type": _STOP})


def _resolve_resume(overrides: list[str]) -> tuple[list[str], str | None]:
    """`sweep.resume=<id>`: replay the interrupted sweep's own overrides (this command's
    tracking.* and cluster.* settings still apply, to find the store and the cluster)."""
    from orchestrator import resume as resuming

    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("sweep.resume=")), None)
    if not resume:
        return overrides, None
    run = resuming.recorded_run(overrides, resume, key="sweep.resume")
    if run.data.tags.get("orchestrator.sweep") != "true":
        raise UserError(
            "sweep.resume", f"run '{resume}' is not a sweep's parent run", "pass the parent run id"
        )
    resuming.refuse_if_driven(run, key="sweep.resume")
    return resuming.replayed_overrides(run, overrides), resume


@dataclass(frozen=True)
class Sweep:
    """What one `orchestrate -m` command sweeps, composed and validated on the driver."""

    base: dict[str, Any]  # the config every trial starts from
    job: Any  # its JobSpec
    dims: list[Dimension]  # the swept keys and their spaces
    group_options: dict[str, dict[str, Any]]  # each swept config group's options, composed
    overrides: list[str]  # as given: recorded on the parent run, replayed by sweep.resume
    argv: list[str]
    metric: str  # what the trials are ranked by, and whether larger is better
    mode: str


def run_sweep(overrides: list[str], argv: list[str], started_at: float) -> int:
    from orchestrator.cli import available, compose_config
    from orchestrator.job import load_job
    from orchestrator.runner import prepare

    overrides, resume_id = _resolve_resume(overrides)
    groups = [g for g in ("optim", "sched") if available(g)]
    fixed, dims = split_overrides(overrides, groups)
    base = compose_config(fixed)
    dims = with_config_space(base, dims, groups)
    if not dims:
        raise UserError(
            "-m", "no sweep given", "add e.g. optim.lr=1e-3,1e-2 or optim.lr='interval(1e-4,1e-1)'"
        )
    group_options = _validate_space(fixed, dims)
    grid = base["sweep"]["search"] == "grid"
    for d in dims:  # e.g. a grid over an interval: refuse before anything starts
        d.to_tune(grid)
    prepare(base, os.getcwd())
    base["launch"] = {"started_at": started_at}
    job = load_job(base["job"]["name"])
    sw, t, trk, cl = base["sweep"], base["trainer"], base["tracking"], base["cluster"]
    metric, mode = sw["metric"] or job.main_metric, sw["mode"] or job.mode

    preflight.check_tracking(trk["uri"])
    for key in job.model_sources:
        preflight.check_model_source(f"job.{key}", base["job"][key], trk["uri"])
    preflight.check_cluster(cl["address"])
    if cl["address"] is None:  # an unplaceable trial fails before anything starts
        launch.check_placeable(t, bool(t["use_gpu"]), launch.embedded_resources(cl))
    print("Starting Ray ...", flush=True)
    resources = launch.connect(cl, state_api=True)
    try:
        launch.check_state_api()
        use_gpu = t["use_gpu"] if t["use_gpu"] is not None else resources.gpus > 0
        launch.check_placeable(t, use_gpu, resources)
        launch.check_storage_shared(cl["storage_path"])
        per_trial = t["num_workers"] * t["cpus_per_worker"]
        concurrent = sw["max_concurrent"] or max(1, int(resources.cpus // per_trial))
        if use_gpu:
            concurrent = min(concurrent, max(1, int(resources.gpus // t["num_workers"])))
        sweep = Sweep(base, job, dims, group_options, overrides, argv, metric, mode)
        return _run(sweep, concurrent, use_gpu, resume_id)
    finally:
        launch.shutdown()


def _quiet_tune() -> None:
    """Tune's console reporter (banner box, TensorBoard hints, trial tables) is for Tune users;
    ours prints its own summary. The legacy reporter at verbose=0 prints nothing."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Let Ctrl-C reach us as KeyboardInterrupt (Tune saves its experiment state as it goes), so
    # the driver marks the runs KILLED and prints the resume command.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")


def _run(sweep: Sweep, concurrent: int, use_gpu: bool, resume_id: str | None) -> int:
    _quiet_tune()
    from ray import tune

    from orchestrator import resume as resuming
    from orchestrator import shared_data
    from orchestrator.runner import log_final_model

    base, job, dims, metric, mode = sweep.base, sweep.job, sweep.dims, sweep.metric, sweep.mode
    sw, trk = base["sweep"], base["tracking"]
    client = tracking.client(trk["uri"])
    if resume_id:
        parent_id = resume_id
        experiment_id = client.get_run(parent_id).info.experiment_id
        client.set_tag(parent_id, resuming.DRIVER_TAG, resuming.driver_tag())
        client.set_terminated(parent_id, "RUNNING")
    else:
        params = {f"space.{d.key}": d.describe() for d in dims}
        params.update(
            {
                "sweep.search": sw["search"],
                "sweep.scheduler": sw["scheduler"],
                "sweep.num_samples": str(sw["num_samples"]),
                "sweep.metric": metric,
                "sweep.mode": mode,
                "sweep.max_concurrent": str(concurrent),
            }
        )
        tags = {
            "orchestrator.sweep": "true",
            "job": base["job"]["name"],
            "orchestrator.overrides": shlex.join(sweep.overrides),
            "orchestrator.command": "orchestrate " + shlex.join(sweep.argv),
            resuming.DRIVER_TAG: resuming.driver_tag(),  # a resume refuses while it lives
        }
        name = (
            trk["run_name"]
            or " ".join(["sweep", base["job"]["name"], *(d.key for d in dims)])[:250]
        )
        parent_id = tracking.create_run(
            trk["uri"], trk["experiment"], name, params, tags, tracking.config_yaml(base)
        )
        experiment_id = client.get_run(parent_id).info.experiment_id
    sweep_name = f"sweep-{parent_id}"
    print(
        f"Sweep parent run {parent_id}: {len(dims)} dimension(s), search={sw['search']}, "
        f"scheduler={sw['scheduler']}, {concurrent} trial(s) at a time",
        flush=True,
    )
    print(f"If interrupted, resume with: orchestrate -m sweep.resume={parent_id}", flush=True)

    # Built once for the whole sweep when no trial's data differs (per trial otherwise: a
    # process each, on the cores the trials train on).
    shared = (
        shared_data.start(base) if shared_data.same_for_every_trial([d.key for d in dims]) else None
    )
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            base=base,
            group_options=sweep.group_options,
            parent_id=parent_id,
            experiment_id=experiment_id,
            sweep_name=sweep_name,
            use_gpu=use_gpu,
            shared=shared,
        ),
        TRIAL_DRIVER_RESOURCES,
    )
    path = os.path.join(base["cluster"]["storage_path"], sweep_name)
    if resume_id and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        grid = sw["search"] == "grid"
        tuner = tune.Tuner(
            trainable,
            param_space={d.key: d.to_tune(grid) for d in dims},
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=1 if grid else sw["num_samples"],
                search_alg=_search(sw["search"], metric, mode),
                scheduler=_scheduler(base),
                max_concurrent_trials=concurrent,
                # A trial's driver process runs the next trial: it imports torch, Ray Train
                # and MLflow first, ~4 s of CPU per trial on the cores the trials train on
                # (benchmarks/NOTES.md). A stopped trial ends itself first (`stop_trial`).
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=sweep_name,
                storage_path=base["cluster"]["storage_path"],
                verbose=0,
                callbacks=[
                    _child_closer(
                        trk["uri"],
                        parent_id,
                        sweep_name,
                        base["trainer"]["max_epochs"],
                        metric,
                        mode,
                    ),
                ],
            ),
        )
    started = time.monotonic()
    previous = _INTERRUPTS.install()
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _mark_unfinished(client, parent_id, "KILLED")
        print(f"\nSweep interrupted. Resume with: orchestrate -m sweep.resume={parent_id}")
        return 130
    finally:
        _INTERRUPTS.restore(previous)  # where not SIG_IGN (set above while KILLED is written)
    rows = _reconcile(client, parent_id, results, base["trainer"]["max_epochs"], metric)
    ok = [r for r in rows if r["status"] == "FINISHED" and r[metric] is not None]
    if not ok:
        tracking.end_run(trk["uri"], parent_id, "FAILED", "no trial finished")
        print("error: no trial finished", flush=True)
        return 1
    best = max(ok, key=lambda r: r[metric] if mode == "max" else -r[metric])
    _log_summary(client, parent_id, rows, best, metric, mode)
    if trk["log_model"] and best["checkpoint"]:
        trial_cfg = trial_config(base, sweep.group_options, best["params"])
        log_final_model(trial_cfg, job, best["run_id"], best["checkpoint"], shared)
    tracking.end_run(trk["uri"], parent_id, "FINISHED")
    _print_table(rows, metric, best, time.monotonic() - started)
    failed = [r for r in rows if r["status"] == "FAILED"]
    if failed:  # the sweep still has a best trial; say plainly that some did not make it
        print(
            f"warning: {len(failed)} of {len(rows)} trials FAILED; "
            "each failed trial's MLflow run says why in its 'error' tag",
            file=sys.stderr,
        )
    return 0


def _keyboard_interrupt(signum: int) -> BaseException:
    return KeyboardInterrupt()


# During `tuner.fit()`: KeyboardInterrupt, but never inside the driver's own MLflow calls.
_INTERRUPTS = DeferredInterrupts(_keyboard_interrupt)


def _search(name: str, metric: str, mode: str):
    if name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=metric, mode=mode)
    return None  # random sampling, or the grid given by grid_search values


def _scheduler(base: dict[str, Any]):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sw = base["sweep"]
    if sw["scheduler"] == "asha":
        # One Tune iteration = one epoch (one report per epoch).
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=base["trainer"]["max_epochs"],
            grace_period=sw["grace_period"],
            reduction_factor=sw["reduction_factor"],
        )
    return FIFOScheduler()


def _close_child(
    client, parent_id: str, trial_id: str, last_result: dict, failed: bool, max_epochs: int
):
    """Give a trial's child run its terminal status; a trial the scheduler stopped doesn't end
    its own run, so the driver does, tagging it `early_stopped` with the epoch it reached."""
    child = tracking.find_child_run(client, parent_id, trial_id)
    # The child run is what reviewers see; a trial can log one more epoch after the
    # scheduler's decision and before it is stopped, so count epochs there.
    logged = child.data.metrics if child is not None else last_result
    epochs = int(logged.get("epoch", 0) or 0)
    early = not failed and epochs < max_epochs
    if child is not None:
        client.set_tag(child.info.run_id, "early_stopped", str(early).lower())
        if early:
            client.set_tag(child.info.run_id, "stopped_at_epoch", str(epochs))
        if child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, "FAILED" if failed else "FINISHED")
    return child, logged, epochs, early


def _child_closer(
    uri: str, parent_id: str, sweep_name: str, max_epochs: int, metric: str, mode: str
):
    """A Tune callback (it runs on the driver) closing each child run as its trial ends, so
    stopped trials don't read RUNNING for the rest of the sweep, and feeding the live trial
    table from the same facts. Holds only plain values: Tune pickles it with the experiment
    for `sweep.resume`, so the table is made on first use."""
    from ray import tune

    from orchestrator.progress import SweepDisplay

    class CloseChildRuns(tune.Callback):
        table: SweepDisplay | None = None

        def __getstate__(self):
            return {}

        def _table(self) -> SweepDisplay:
            if self.table is None:
                self.table = SweepDisplay(metric, mode)
            return self.table

        def _close(self, trial, failed: bool) -> None:
            early, epochs = False, None
            # Told first, before any MLflow call that could fail or wait: a stopped trial
            # that goes on training would keep its process from the next trial. Tune's last
            # result is the one the scheduler stopped it on.
            if not failed and int((trial.last_result or {}).get("epoch", 0)) < max_epochs:
                try:
                    stop_trial(sweep_name, trial.trial_id)
                except Exception as exc:
                    print(f"warning: could not stop trial {trial.trial_id}: {exc}", flush=True)
            try:
                with _INTERRUPTS.shielded():  # a Ctrl-C now is raised once the writes are done
                    _, _, epochs, early = _close_child(
                        tracking.client(uri),
                        parent_id,
                        trial.trial_id,
                        trial.last_result or {},
                        failed,
                        max_epochs,
                    )
            except Exception as exc:  # the final reconciliation will try again
                print(
                    f"warning: could not close the run of trial {trial.trial_id}: {exc}", flush=True
                )
            self._table().ended(trial.trial_id, "FAILED" if failed else "FINISHED", early, epochs)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._table().started(trial.trial_id, dict(trial.config))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._table().result(trial.trial_id, int(result.get("epoch", 0)), result.get(metric))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial, failed=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, failed=True)

    return CloseChildRuns()


def _reconcile(
    client, parent_id: str, results, max_epochs: int, metric: str
) -> list[dict[str, Any]]:
    """Every trial's row for the summary, and a terminal status for every child run."""
    rows = []
    for result in results:
        trial_id = result.metrics.get("trial_id") or os.path.basename(result.path).split("_")[1]
        failed = result.error is not None
        child, logged, epochs, early = _close_child(
            client, parent_id, trial_id, result.metrics, failed, max_epochs
        )
        rows.append(
            {
                "trial": trial_id,
                "run_id": child.info.run_id if child else None,
                "params": dict(result.config or {}),
                "status": "FAILED" if failed else "FINISHED",
                "epochs": epochs,
                metric: logged.get(metric),
                "early_stopped": early,
                "checkpoint": result.metrics.get("checkpoint_path"),
            }
        )
    return rows


def _log_summary(client, parent_id, rows, best, metric, mode) -> None:
    from mlflow.entities import Metric

    ordered = sorted(
        rows,
        key=lambda r: (r[metric] is None, -(r[metric] or 0) if mode == "max" else (r[metric] or 0)),
    )
    out = io.StringIO()
    keys = sorted({k for r in rows for k in r["params"]})
    writer = csv.writer(out)
    writer.writerow(["trial", "run_id", *keys, metric, "epochs", "early_stopped", "status"])
    for r in ordered:
        writer.writerow(
            [
                r["trial"],
                r["run_id"],
                *(r["params"].get(k) for k in keys),
                r[metric],
                r["epochs"],
                r["early_stopped"],
                r["status"],
            ]
        )
    client.log_text(parent_id, out.getvalue(), "trials.csv")
    now = int(time.time() * 1000)
    client.log_batch(
        parent_id,
        metrics=[
            Metric(f"best/{metric}", float(best[metric]), now, 0),
            Metric("trials", float(len(rows)), now, 0),
        ],
    )
    client.set_tag(parent_id, "best_trial", best["trial"])
    client.set_tag(parent_id, "best_run_id", best["run_id"] or "")
    if best["run_id"]:
        client.set_tag(best["run_id"], "best_trial", "true")


def _mark_unfinished(client, parent_id: str, status: str) -> None:
    for run in client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'",
    ):
        client.set_terminated(run.info.run_id, status)
    client.set_terminated(parent_id, status)


def _print_table(rows, metric, best, seconds) -> None:
    print(
        f"\nSweep finished in {seconds:.0f}s: {len(rows)} trials; best {metric} = {best[metric]:.4f} "
        f"(trial {best['trial']}, run {best['run_id']})"
    )
    for r in sorted(rows, key=lambda r: r["trial"]):
        params = " ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items()
        )
        value = f"{r[metric]:.4f}" if r[metric] is not None else "-"
        flag = f" (stopped at epoch {r['epochs']})" if r["early_stopped"] else ""
        print(f"  {r['trial']}  {r['status']:<8} {metric} {value}  {params}{flag}")
