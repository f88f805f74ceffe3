"""Which Ray Train trainer class a run uses. Imported by `launch` only, after Ray is set up.

Ray Train V2 starts helpers beside every run that some of our runs do not need. Each is one
more Python process to start on the same CPUs as the workers (1–1.5 s of CPU each, measured
on 2 CPUs), and two of them sit on the path to the first step:

- `DatasetsCallback` starts a `DatasetManager` actor for Ray Datasets. Jobs here build their
  own data (orchestrator/shared_data.py) and pass no Ray Datasets: no run needs it.
- The fixed scaling policy asks Ray Data's `AutoscalingCoordinator` for the workers'
  resources, so that an autoscaler can add nodes; the controller creates that actor and waits
  for its answer before it starts the workers. The embedded cluster has no autoscaler.
- `PlacementGroupCleaner` (a detached actor) frees the workers' placement group if the
  controller dies without cleaning up while its job's driver lives on. Ray itself frees a
  placement group once both the actor that created it and its job have ended. That matters
  in sweeps: Tune stops a trial by killing its controller while the sweep's driver goes on.
  A single job's driver ends when its controller dies (`fit` raises), and when the driver
  dies Ray ends its controller with it, on any cluster: single jobs run without the cleaner
  (tests/test_faults.py checks a killed driver's placement group is removed). At the end of
  every run Ray also waits for the cleaner to stop: ~1 s, ~12 s without the State API.

Ray Train also gives its controller and its workers a runtime env of their own, to carry the
driver's RAY_TRAIN_* settings to another machine. An actor with a runtime env cannot be one of
the idle worker processes Ray keeps ready: Ray starts a new process for it, through its
runtime-env setup (a second Python start-up). So the controller and workers start without one
wherever there is nothing to carry: on the embedded cluster every process already inherits
the driver's environment (launch.connect sets it before `ray.init`), and on any other cluster
when the driver has no RAY_TRAIN_* setting of its own (a user who sets one gets Ray's way).
The one setting we need, a 0.25 s poll instead of Ray's 2 s, is set by the controller class
itself (`JobTrainController`), not through the environment. Measured on 2 CPUs: embedded,
cold cnn_digits, medians of 5 alternated pairs: fit → workers entered 7.9 → 6.9 s; on a
`ray start` head: see benchmarks/NOTES.md. Rank 0 also wakes the controller to poll as each
epoch's report starts, so jobs with short epochs do not wait for a poll every epoch.

On a cluster the driver joined, the workers also import torch's optimizer machinery while they
wait for the group to start (orchestrator/worker_actor.py). The controller's classes are in
orchestrator/controller.py and its process-group backend in orchestrator/process_group.py:
neither imports torch, which the controller process would otherwise load for nothing. Ray's
preemption watcher polls from a thread of the controller's process, not an actor of its own.

`_create_default_callbacks`, `_initialize_and_run_controller`, `_register_sigint_handler`,
`TrainController.worker_group_cls`, `TrainController._health_check_interval_s`,
`WorkerGroup._worker_cls`, `WorkerGroup._get_worker_runtime_env`, `RayTrainWorker`,
`TrainController._worker_group_callbacks_to_propagate`, `TrainController._poll_workers` and
`_latest_poll_time`, `TrainContext.controller_actor`, `PreemptionCallback` and
`PreemptionWatcher` are private Ray API (2.60): tests/test_trainers.py checks
what each class leaves out and keeps, so a Ray upgrade that renames them fails a test instead
of silently bringing the cost back.
"""

from __future__ import annotations

import threading

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)
from ray.train.v2._internal.constants import get_env_vars_to_propagate
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy, ScalingPolicy

from orchestrator.controller import (
    ClusterTrainControllerWithoutRuntimeEnv,
    FixedScalingWithoutAutoscaler,
    JobTrainController,
    TrainControllerWithoutRuntimeEnv,
)
from orchestrator.process_group import ProcessGroupConfig


class JobTorchTrainer(TorchTrainer):
    """A single job on a cluster the driver joined: a TorchTrainer without Ray Datasets'
    manager actor or the placement-group cleaner (the base of every trainer here); its process
    group is set up by `ProcessGroupConfig` unless given another config."""

    # Sweep trials keep it: a stopped trial ends by killing its controller (`end_train_run`).
    keeps_cleaner = False
    # On the embedded cluster: no autoscaler, and every process inherits the driver's env.
    embedded = False

    def __init__(self, *args, torch_config=None, **kwargs):
        super().__init__(*args, torch_config=torch_config or ProcessGroupConfig(), **kwargs)

    def _create_default_callbacks(self):
        dropped = (
            (DatasetsCallback,)
            if self.keeps_cleaner
            else (DatasetsCallback, PlacementGroupCleanerCallback)
        )
        return [c for c in super()._create_default_callbacks() if not isinstance(c, dropped)]

    def scaling_policy(self, ray_default: ScalingPolicy) -> ScalingPolicy:
        """The policy this run's controller gets in place of Ray's default."""
        if not self.embedded or type(ray_default) is not FixedScalingPolicy:
            return ray_default
        return FixedScalingWithoutAutoscaler(ray_default.scaling_config)

    def settings_to_carry(self) -> dict[str, str]:
        """The driver's RAY_TRAIN_* settings that the controller and workers would not see
        otherwise: none on the embedded cluster, whose processes inherit the driver's env."""
        return {} if self.embedded else get_env_vars_to_propagate()

    def controller_actor(self):
        """The controller's actor class. Pinned to the driver's node, as Ray does; with a
        runtime env (Ray's way) only when there are settings to carry."""
        options = {
            "num_cpus": 0,
            "label_selector": {
                ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()
            },
        }
        settings = self.settings_to_carry()
        if not settings:
            return ray.remote(**options)(
                TrainControllerWithoutRuntimeEnv
                if self.embedded
                else ClusterTrainControllerWithoutRuntimeEnv
            )
        return ray.remote(**options, runtime_env={"env_vars": settings})(JobTrainController)

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        # Ray's method, with our controller class and policy.
        ray_default = controller_init_kwargs["scaling_policy"]
        controller_init_kwargs["scaling_policy"] = self.scaling_policy(ray_default)
        controller = self.controller_actor().remote(**controller_init_kwargs)
        self.controller = controller  # for launch.end_train_run
        if threading.current_thread() is threading.main_thread():  # not inside a Tune trial
            self._register_sigint_handler(controller)
        ray.get(controller.run.remote())
        return ray.get(controller.get_result.remote())


class ClusterSweepTrialTrainer(JobTorchTrainer):
    """A sweep trial on a cluster the driver joined: keeps the cleaner for Tune."""

    keeps_cleaner = True


class EmbeddedTorchTrainer(JobTorchTrainer):
    """A single job on the embedded cluster: no autoscaler either."""

    embedded = True


class EmbeddedSweepTrialTrainer(EmbeddedTorchTrainer):
    """A sweep trial on the embedded cluster: no autoscaler; keeps the cleaner for Tune."""

    keeps_cleaner = True


def trainer_class(embedded: bool, sweep_trial: bool) -> type[JobTorchTrainer]:
    if embedded:
        return EmbeddedSweepTrialTrainer if sweep_trial else EmbeddedTorchTrainer
    return ClusterSweepTrialTrainer if sweep_trial else JobTorchTrainer
