"""Which Ray Train trainer class a run uses. Imported by `launch` only, after Ray is set up.

Ray Train V2 starts helpers beside every run that some of our runs do not need. Each is one
more Python process to start on the same CPUs as the workers (1–1.5 s of CPU each, measured
on 2 CPUs), and two of them sit on the path to the first step:

- `DatasetsCallback` starts a `DatasetManager` actor for Ray Datasets. Jobs here build their
  own data (orchestrator/shared_data.py) and pass no Ray Datasets: no run needs it.
- The fixed scaling policy asks Ray Data's `AutoscalingCoordinator` for the workers'
  resources, so that an autoscaler can add nodes; the controller creates that actor and waits
  for its answer before it starts the workers. The embedded cluster has no autoscaler.
- `PlacementGroupCleaner` frees the workers' placement group if the controller dies without
  cleaning up, which matters on a long-lived cluster (the driver's machine may vanish) and in
  sweeps (Tune stops a trial by killing its controller). A single job on the embedded cluster
  needs none of it — the whole cluster ends with this process — and at the end of every run
  Ray waits for the cleaner to stop, ~12 s when its State API query is slow or missing.

`_create_default_callbacks` and `_initialize_and_run_controller` are private Ray API (2.60):
tests/test_trainers.py checks what each class leaves out and keeps, so a Ray upgrade that
renames them fails a test instead of silently bringing the cost back.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy, ScalingPolicy


class FixedScalingWithoutAutoscaler(FixedScalingPolicy):
    """Ray's fixed scaling, minus the resource requests nobody reads on a cluster without an
    autoscaler (the cancel at shutdown is already a no-op when none was sent)."""

    def after_controller_start(self, train_run_context) -> None:
        pass

    def _maybe_send_resource_request(self) -> None:
        pass


class JobTorchTrainer(TorchTrainer):
    """A TorchTrainer without Ray Datasets' manager actor, for every run on any cluster."""

    keeps_cleaner = True
    has_autoscaler = True

    def _create_default_callbacks(self):
        dropped = (
            (DatasetsCallback,)
            if self.keeps_cleaner
            else (DatasetsCallback, PlacementGroupCleanerCallback)
        )
        return [c for c in super()._create_default_callbacks() if not isinstance(c, dropped)]

    def scaling_policy(self, ray_default: ScalingPolicy) -> ScalingPolicy:
        """The policy this run's controller gets in place of Ray's default."""
        if self.has_autoscaler or type(ray_default) is not FixedScalingPolicy:
            return ray_default
        return FixedScalingWithoutAutoscaler(ray_default.scaling_config)

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        ray_default = controller_init_kwargs["scaling_policy"]
        controller_init_kwargs["scaling_policy"] = self.scaling_policy(ray_default)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


class EmbeddedSweepTrialTrainer(JobTorchTrainer):
    """A sweep trial on the embedded cluster: no autoscaler; keeps the cleaner for Tune."""

    has_autoscaler = False


class EmbeddedTorchTrainer(JobTorchTrainer):
    """A single job on the embedded cluster: no autoscaler, no placement-group cleaner."""

    keeps_cleaner = False
    has_autoscaler = False


def trainer_class(embedded: bool, sweep_trial: bool) -> type[JobTorchTrainer]:
    if not embedded:
        return JobTorchTrainer
    return EmbeddedSweepTrialTrainer if sweep_trial else EmbeddedTorchTrainer
