"""The trainer class each kind of run gets (orchestrator/trainers.py), built without a cluster."""

from __future__ import annotations

from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)

from orchestrator.trainers import EmbeddedTorchTrainer, trainer_class


def _callbacks(cls, tmp_path) -> list[type]:
    trainer = cls(
        lambda config: None,
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name="t", storage_path=str(tmp_path)),
    )
    return [type(c) for c in trainer._create_default_callbacks()]


def test_the_embedded_trainer_drops_exactly_the_placement_group_cleaner(tmp_path):
    ray_default = _callbacks(TorchTrainer, tmp_path)
    embedded = _callbacks(EmbeddedTorchTrainer, tmp_path)
    # If a Ray upgrade renames the callback, this fails instead of the 12 s coming back.
    assert PlacementGroupCleanerCallback in ray_default
    assert embedded == [c for c in ray_default if c is not PlacementGroupCleanerCallback]


def test_only_single_jobs_on_embedded_ray_leave_out_the_cleaner():
    assert trainer_class(embedded=True, sweep_trial=False) is EmbeddedTorchTrainer
    # Tune stops a sweep trial by killing its controller: the cleaner frees its CPUs.
    assert trainer_class(embedded=True, sweep_trial=True) is TorchTrainer
    # A long-lived cluster outlives this driver: keep Ray's guard.
    assert trainer_class(embedded=False, sweep_trial=False) is TorchTrainer
