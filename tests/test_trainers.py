"""The trainer class each kind of run gets (orchestrator/trainers.py): what it leaves out of Ray
Train's defaults, checked on the classes and on a real embedded run's processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)
from ray.train.v2._internal.execution.scaling_policy import (
    FixedScalingPolicy,
    NoopDecision,
    ResizeDecision,
    create_scaling_policy,
)

from orchestrator.controller import POLL_INTERVAL_S, FixedScalingWithoutAutoscaler
from orchestrator.trainers import (
    ClusterSweepTrialTrainer,
    EmbeddedSweepTrialTrainer,
    EmbeddedTorchTrainer,
    JobTorchTrainer,
    trainer_class,
)
from orchestrator.worker_actor import WorkerImportingAhead
from tests.conftest import TRAIN_WORKER_TITLES, training_under_way


def _trainer(cls, tmp_path):
    return cls(
        lambda config: None,
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="t", storage_path=str(tmp_path)),
    )


def _callbacks(cls, tmp_path) -> list[type]:
    return [type(c) for c in _trainer(cls, tmp_path)._create_default_callbacks()]


def test_each_trainer_drops_exactly_what_its_runs_do_not_need(tmp_path):
    ray_default = _callbacks(TorchTrainer, tmp_path)
    # If a Ray upgrade renames a callback, this fails instead of its cost coming back.
    assert DatasetsCallback in ray_default and PlacementGroupCleanerCallback in ray_default
    no_datasets = [c for c in ray_default if c is not DatasetsCallback]
    # Sweep trials keep the cleaner: Tune stops a trial by killing its controller.
    assert _callbacks(ClusterSweepTrialTrainer, tmp_path) == no_datasets
    assert _callbacks(EmbeddedSweepTrialTrainer, tmp_path) == no_datasets
    # A single job's placement group goes with its driver (tests/test_faults.py checks it).
    for single_job in (JobTorchTrainer, EmbeddedTorchTrainer):
        assert _callbacks(single_job, tmp_path) == [
            c for c in no_datasets if c is not PlacementGroupCleanerCallback
        ]


def test_only_the_embedded_cluster_skips_autoscaler_requests(tmp_path):
    ray_default = create_scaling_policy(ScalingConfig(num_workers=2))
    assert type(ray_default) is FixedScalingPolicy
    # A real cluster may have an autoscaler that reads them: Ray's policy, untouched.
    for cls in (JobTorchTrainer, ClusterSweepTrialTrainer):
        assert _trainer(cls, tmp_path).scaling_policy(ray_default) is ray_default
    for cls in (EmbeddedTorchTrainer, EmbeddedSweepTrialTrainer):
        policy = _trainer(cls, tmp_path).scaling_policy(ray_default)
        assert type(policy) is FixedScalingWithoutAutoscaler
        assert policy.scaling_config is ray_default.scaling_config


def test_the_policy_without_autoscaler_decides_like_rays_without_a_coordinator():
    config = ScalingConfig(num_workers=2)
    # Ray's own needs the coordinator created at controller start before any decision...
    with pytest.raises(AssertionError):
        FixedScalingPolicy(config).make_decision_for_non_running_worker_group()
    # ... ours creates none and makes the same decisions.
    policy = FixedScalingWithoutAutoscaler(config)
    policy.after_controller_start(None)
    decision = policy.make_decision_for_non_running_worker_group()
    assert decision == ResizeDecision(num_workers=2, resources_per_worker={"CPU": 1})
    assert isinstance(policy.make_decision_for_running_worker_group(None, None), NoopDecision)
    assert policy._coordinator_client is None


def test_trainer_class_per_kind_of_run():
    assert trainer_class(embedded=True, sweep_trial=False) is EmbeddedTorchTrainer
    # Tune stops a sweep trial by killing its controller: the cleaner frees its CPUs.
    assert trainer_class(embedded=True, sweep_trial=True) is EmbeddedSweepTrialTrainer
    # A cluster the driver joined may autoscale: Ray's resource requests stay.
    assert trainer_class(embedded=False, sweep_trial=False) is JobTorchTrainer
    assert trainer_class(embedded=False, sweep_trial=True) is ClusterSweepTrialTrainer


def _process_titles(root: psutil.Process) -> str:
    """Every descendant's title: Ray names an actor's process `ray::<Class>[.<method>]`."""
    titles = []
    for p in root.children(recursive=True):
        try:
            titles.append(" ".join(p.cmdline()))
        except psutil.Error:  # ended meanwhile
            continue
    return "\n".join(titles)


@pytest.mark.slow
def test_an_embedded_job_starts_no_helper_it_does_not_need(tmp_path):
    args = ["job=mlp_tabular", "trainer.num_workers=2", "trainer.max_epochs=1000"]
    # Every helper that would be started is started before the first epoch ends.
    with training_under_way(args, tmp_path, timeout=300) as proc:
        titles = _process_titles(psutil.Process(proc.pid))
    # Not vacuous: the run's own Ray Train actors are seen by their process titles.
    # (The controller is Ray's TrainController or one of ours, each named *TrainController*.)
    for actor in ("TrainController", "ray::RayTrainWorker", "ray::SynchronizationActor"):
        assert actor in titles, f"{actor} not among:\n{titles}"
    for helper in (
        "DatasetManager",
        "AutoscalingCoordinator",
        "PlacementGroupCleaner",
        "PreemptionWatcher",
    ):
        assert helper not in titles, f"{helper} started:\n{titles}"


# Run in a process of its own: an embedded Ray started as `orchestrate` starts it (argv[2]
# "embedded") or the session's head joined (argv[2] its address), then tiny fits, one per
# (label, trainer, RAY_TRAIN_* settings in the driver's env); each worker and the controller
# (through a user callback, which runs there) write what runtime env they got, the poll
# variable they see and, in the controller, the poll interval it uses and whether it imported
# torch; each worker also its process title (Ray's `ray::<actor class>`) and whether
# torch._dynamo was imported already when the training function began (torch is: Ray Train
# imports it to set up the group).
_RUNTIME_ENVS = r"""
import gc, json, os, pathlib, sys, threading, time
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2.api.callback import UserCallback
from orchestrator.context import RayContext
from orchestrator.launch import connect, shutdown
from orchestrator.trainers import EmbeddedTorchTrainer, JobTorchTrainer

def record(path, **extra):
    seen = {"runtime_env": dict(ray.get_runtime_context().runtime_env),
            "poll_env": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"), **extra}
    pathlib.Path(path).write_text(json.dumps(seen))

def train_fn(config):
    dynamo_imported = "torch._dynamo" in sys.modules
    ctx = RayContext()  # reports as the loop does, one right after another: epochs of no work
    started = time.monotonic()
    for epoch in range(3):
        ctx.report({"epoch": epoch}, None)
    record(f"{config['out']}/worker-{ctx.rank}.json",
           title=pathlib.Path("/proc/self/cmdline").read_text().split("\0")[0],
           dynamo_imported=dynamo_imported, reports_s=time.monotonic() - started)

class RecordController(UserCallback):
    def __init__(self, out):
        self.out = out
    def after_report(self, run_context, metrics, checkpoint):
        (controller,) = [o for o in gc.get_objects() if isinstance(o, TrainController)]
        record(f"{self.out}/controller.json", interval=controller._health_check_interval_s,
               torch_imported="torch" in sys.modules,
               watcher_thread=any(t.name == "PreemptionWatcher" for t in threading.enumerate()))

root, where = pathlib.Path(sys.argv[1]), sys.argv[2]
if where == "embedded":
    connect({"address": None, "num_cpus": 2, "show_worker_logs": False})
    fits = [("ours", EmbeddedTorchTrainer, {}), ("rays", TorchTrainer, {})]
else:
    connect({"address": where, "num_cpus": None, "show_worker_logs": False})
    fits = [("ours", JobTorchTrainer, {}),
            ("ours_with_a_setting", JobTorchTrainer, {"RAY_TRAIN_COLLECTIVE_WARN_INTERVAL_S": "77"})]
try:
    for label, cls, settings in fits:
        os.environ.update(settings)
        out = root / label
        out.mkdir()
        cls(train_fn, train_loop_config={"out": str(out)},
            scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(name=label, storage_path=str(root / "storage"),
                                 callbacks=[RecordController(str(out))])).fit()
        for key in settings:
            del os.environ[key]
finally:
    shutdown()  # as `orchestrate` ends: Ray stopped (or left), its private temp dir removed
"""


def _runtime_envs(tmp_path, where: str) -> dict[str, dict[str, dict]]:
    """{fit label: {"controller" | "worker-<rank>": what that process recorded}}."""
    script = tmp_path / "runtime_envs.py"
    script.write_text(_RUNTIME_ENVS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_TRAIN_")}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), where],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    fits = {}
    for label in sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != "storage"):
        files = sorted((tmp_path / label).glob("*.json"))
        fits[label] = {f.stem: json.loads(f.read_text()) for f in files}
        assert sorted(fits[label]) == ["controller", "worker-0", "worker-1"], label
    return fits


@pytest.mark.slow
def test_embedded_controller_and_workers_inherit_the_driver_env_without_a_runtime_env(tmp_path):
    fits = _runtime_envs(tmp_path, "embedded")
    assert sorted(fits) == ["ours", "rays"]
    for process, got in fits["ours"].items():
        # No runtime env: any idle Ray worker process can serve; the embedded settings arrive.
        assert got["runtime_env"] == {}, process
    # The poll interval comes from our controller class, not from the environment.
    assert fits["ours"]["controller"]["poll_env"] is None
    assert fits["ours"]["controller"]["interval"] == POLL_INTERVAL_S
    # Our controller sets up the process group without loading torch (process_group.py).
    assert fits["ours"]["controller"]["torch_imported"] is False
    # Not vacuous: Ray's own trainer gives each its own runtime env, polls every 2 s, and its
    # controller imports torch with Ray's TorchConfig.
    for process, got in fits["rays"].items():
        assert got["runtime_env"]["env_vars"], process
    assert fits["rays"]["controller"]["interval"] == 2.0
    assert fits["rays"]["controller"]["torch_imported"] is True
    # A worker holds one report until a poll takes it. Three reports in a row: Ray's controller
    # takes the first two at two polls one interval apart, so the third waits for the second
    # poll; ours polls as rank 0 says each report is coming.
    assert fits["rays"]["worker-0"]["reports_s"] >= 2.0 - 0.1
    assert fits["ours"]["worker-0"]["reports_s"] < POLL_INTERVAL_S
    # Right after Ray starts, workers import nothing ahead (no faster there): Ray's own actor.
    for fit in ("ours", "rays"):
        for rank in ("worker-0", "worker-1"):
            assert fits[fit][rank]["title"].startswith("ray::RayTrainWorker"), fits[fit][rank]
            assert not fits[fit][rank]["dynamo_imported"], (fit, rank)


@pytest.mark.slow
def test_on_a_cluster_a_runtime_env_carries_only_the_users_ray_train_settings(tmp_path, ray_head):
    fits = _runtime_envs(tmp_path, ray_head)
    assert sorted(fits) == ["ours", "ours_with_a_setting"]
    # Nothing to carry: no runtime env, so idle worker processes serve (the job has none either).
    for process, got in fits["ours"].items():
        assert got["runtime_env"] == {}, process
    assert fits["ours"]["controller"]["interval"] == POLL_INTERVAL_S
    # A RAY_TRAIN_* setting in the driver's environment reaches every process, Ray's way.
    for process, got in fits["ours_with_a_setting"].items():
        env_vars = got["runtime_env"]["env_vars"]
        assert env_vars["RAY_TRAIN_COLLECTIVE_WARN_INTERVAL_S"] == "77", process
    assert fits["ours_with_a_setting"]["controller"]["interval"] == POLL_INTERVAL_S
    for fit in ("ours", "ours_with_a_setting"):
        assert fits[fit]["controller"]["torch_imported"] is False, fit
        assert fits[fit]["worker-0"]["reports_s"] < POLL_INTERVAL_S, fit  # as embedded: above
        # Ray's preemption watcher polls from a thread of our controller's process, not from
        # an actor process of its own (the embedded cluster turns it off: launch.py).
        assert fits[fit]["controller"]["watcher_thread"] is True, fit
    # On a cluster, either way, the workers imported torch._dynamo (which every optimizer needs)
    # while the group started; embedded workers have not (the test above: not vacuous).
    # (The tests' checks for workers left behind know this title too.)
    assert WorkerImportingAhead.__name__ in TRAIN_WORKER_TITLES
    for fit in ("ours", "ours_with_a_setting"):
        for rank in ("worker-0", "worker-1"):
            assert fits[fit][rank]["title"].startswith("ray::WorkerImportingAhead"), (fit, rank)
            assert fits[fit][rank]["dynamo_imported"], (fit, rank)
