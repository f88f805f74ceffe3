"""Which Ray Train trainer class a run uses. Imported by `launch` only, after Ray is set up.

Ray Train V2 starts a detached `PlacementGroupCleaner` actor beside every run's controller. It
frees the workers' placement group if the controller dies without cleaning up, which matters
on a long-lived cluster (the driver's machine may vanish) and in sweeps (Tune stops a trial by
killing its controller). On the embedded cluster a single job needs none of that — the whole
cluster ends with this process — and the cleaner costs: one more actor process to start, and
at the end of every run Ray waits for it to stop, which takes ~12 s when its State API query
is slow or missing (measured on 2 CPUs, with and without the dashboard).

`_create_default_callbacks` is private Ray API (2.60): tests/test_trainers.py checks
that the embedded trainer drops exactly the cleaner and keeps every other callback, so a Ray
upgrade that renames it fails a test instead of silently bringing the 12 s back.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)


class EmbeddedTorchTrainer(TorchTrainer):
    """A TorchTrainer without the placement-group cleaner, for single jobs on embedded Ray."""

    def _create_default_callbacks(self):
        return [
            c
            for c in super()._create_default_callbacks()
            if not isinstance(c, PlacementGroupCleanerCallback)
        ]


def trainer_class(embedded: bool, sweep_trial: bool) -> type[TorchTrainer]:
    return EmbeddedTorchTrainer if embedded and not sweep_trial else TorchTrainer
