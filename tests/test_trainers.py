"""The trainer class each kind of run gets (orchestrator/trainers.py): what it leaves out of Ray
Train's defaults, checked on the classes and on a real embedded run's processes."""

from __future__ import annotations

import json
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

from orchestrator.trainers import (
    EmbeddedSweepTrialTrainer,
    EmbeddedTorchTrainer,
    FixedScalingWithoutAutoscaler,
    JobTorchTrainer,
    trainer_class,
)
from tests.conftest import training_under_way


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
    assert _callbacks(JobTorchTrainer, tmp_path) == no_datasets
    assert _callbacks(EmbeddedSweepTrialTrainer, tmp_path) == no_datasets
    assert _callbacks(EmbeddedTorchTrainer, tmp_path) == [
        c for c in no_datasets if c is not PlacementGroupCleanerCallback
    ]


def test_only_the_embedded_cluster_skips_autoscaler_requests(tmp_path):
    ray_default = create_scaling_policy(ScalingConfig(num_workers=2))
    assert type(ray_default) is FixedScalingPolicy
    # A real cluster may have an autoscaler that reads them: Ray's policy, untouched.
    assert _trainer(JobTorchTrainer, tmp_path).scaling_policy(ray_default) is ray_default
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
    # A long-lived cluster outlives this driver and may autoscale: keep Ray's guard and requests.
    assert trainer_class(embedded=False, sweep_trial=False) is JobTorchTrainer
    assert trainer_class(embedded=False, sweep_trial=True) is JobTorchTrainer


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
    # (The controller is Ray's TrainController or, embedded, our EmbeddedTrainController.)
    for actor in ("TrainController", "ray::RayTrainWorker", "ray::SynchronizationActor"):
        assert actor in titles, f"{actor} not among:\n{titles}"
    for helper in ("DatasetManager", "AutoscalingCoordinator", "PlacementGroupCleaner"):
        assert helper not in titles, f"{helper} started:\n{titles}"


# Run in a process of its own: an embedded Ray started as `orchestrate` starts it, then one tiny
# fit with our embedded trainer and one with Ray's; each worker and the controller (through a
# user callback, which runs there) write what runtime env they got and the driver's poll setting.
_RUNTIME_ENVS = r"""
import json, os, pathlib, sys
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback
from orchestrator.launch import connect, shutdown
from orchestrator.trainers import EmbeddedTorchTrainer

def record(path):
    seen = {"runtime_env": dict(ray.get_runtime_context().runtime_env),
            "poll": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
    pathlib.Path(path).write_text(json.dumps(seen))

def train_fn(config):
    record(f"{config['out']}/worker-{ray.train.get_context().get_world_rank()}.json")
    ray.train.report({"done": 1})

class RecordController(UserCallback):
    def __init__(self, out):
        self.out = out
    def after_report(self, run_context, metrics, checkpoint):
        record(f"{self.out}/controller.json")

connect({"address": None, "num_cpus": 2, "show_worker_logs": False})
root = pathlib.Path(sys.argv[1])
try:
    for cls in (EmbeddedTorchTrainer, TorchTrainer):
        out = root / cls.__name__
        out.mkdir()
        cls(train_fn, train_loop_config={"out": str(out)},
            scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(name=cls.__name__, storage_path=str(root / "storage"),
                                 callbacks=[RecordController(str(out))])).fit()
finally:
    shutdown()  # as `orchestrate` ends: Ray stopped, its private temp dir removed
"""


@pytest.mark.slow
def test_embedded_controller_and_workers_inherit_the_driver_env_without_a_runtime_env(tmp_path):
    script = tmp_path / "runtime_envs.py"
    script.write_text(_RUNTIME_ENVS)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]

    def seen(trainer: str) -> dict[str, dict]:
        files = sorted((tmp_path / trainer).glob("*.json"))
        return {f.stem: json.loads(f.read_text()) for f in files}

    ours, rays = seen("EmbeddedTorchTrainer"), seen("TorchTrainer")
    assert sorted(ours) == sorted(rays) == ["controller", "worker-0", "worker-1"]
    for process, got in ours.items():
        # No runtime env: any idle Ray worker process can serve; the setting still arrives.
        assert got == {"runtime_env": {}, "poll": "0.25"}, process
    # Not vacuous: Ray's own trainer carries the same setting in a runtime env of their own.
    for process, got in rays.items():
        assert got["runtime_env"]["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.25"
        assert got["poll"] == "0.25", process
