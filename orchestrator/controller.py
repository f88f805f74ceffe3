"""Ray Train's controller and worker-group classes for our runs (see orchestrator/trainers.py
for why each exists, and which run gets which).

This module is what the controller actor's process loads to create the controller, so it
imports no torch, directly or through Ray's torch modules: `import ray.train.torch` costs 1.4 s
of CPU there, on the path to the first step (orchestrator/process_group.py).
"""

from __future__ import annotations

import asyncio
import os

import ray
from ray.train.v2._internal.callbacks.preemption_callback import PreemptionCallback
from ray.train.v2._internal.constants import (
    HEALTH_CHECK_INTERVAL_S_ENV_VAR,
    RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
)
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2._internal.execution.preemption import PreemptionWatcher
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
from ray.train.v2._internal.execution.worker_group import WorkerGroup
from ray.train.v2._internal.util import time_monotonic

from orchestrator.worker_actor import WorkerImportingAhead


class FixedScalingWithoutAutoscaler(FixedScalingPolicy):
    """Ray's fixed scaling, minus the resource requests nobody reads on a cluster without an
    autoscaler (the cancel at shutdown is already a no-op when none was sent)."""

    def after_controller_start(self, train_run_context) -> None:
        pass

    def _maybe_send_resource_request(self) -> None:
        pass


# Ray Train V2's controller polls its workers every 2 s, and a report that carries a
# checkpoint waits for that poll: 2 s lost per epoch. 0.25 s cuts it to ~0.25 s (measured);
# rank 0 also wakes the controller as it reports (JobTrainController.report_coming).
POLL_INTERVAL_S = 0.25


class WorkerGroupWithoutRuntimeEnv(WorkerGroup):
    """Workers with no runtime env beyond the user's (none here), so an idle Ray worker process
    can serve: for runs whose driver has no RAY_TRAIN_* setting to carry to them."""

    @staticmethod
    def _get_worker_runtime_env(custom_runtime_env):
        return dict(custom_runtime_env)


class ClusterWorkerGroup(WorkerGroup):
    """On a cluster this driver joined: workers that import what the first step needs while
    they wait for the rest of the group (orchestrator/worker_actor.py). Not on the embedded
    cluster, whose workers start right after Ray itself on the same CPUs: there the imports
    ahead found no idle CPU and were no faster (benchmarks/NOTES.md)."""

    _worker_cls = WorkerImportingAhead


class ClusterWorkerGroupWithoutRuntimeEnv(ClusterWorkerGroup, WorkerGroupWithoutRuntimeEnv):
    pass


class PreemptionWatcherInProcess(PreemptionCallback):
    """Ray's preemption watcher (it polls Ray for nodes being drained and tells the workers on
    them) as a thread of the controller's process rather than an actor of its own: the actor is
    one more Python process started as the worker group comes up, ~1 s of CPU taken from the
    first steps on a small machine (benchmarks/NOTES.md). The watcher runs its poll loop in a
    thread either way; it holds nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self._in_process: PreemptionWatcher | None = None

    def after_worker_group_start(self, worker_group) -> None:
        self._stop_watcher()
        node_to_ranks: dict[str, list[int]] = {}
        worker_actors_by_rank = {}
        for worker in worker_group.get_workers():
            rank = worker.distributed_context.world_rank
            node_to_ranks.setdefault(worker.metadata.node_id, []).append(rank)
            worker_actors_by_rank[rank] = worker.actor
        self._in_process = PreemptionWatcher(
            node_to_ranks=node_to_ranks,
            poll_interval_s=self._poll_interval_s,
            worker_actors_by_rank=worker_actors_by_rank,
        )

    def _stop_watcher(self) -> None:
        watcher, self._in_process = self._in_process, None
        if watcher is not None:
            watcher._stop_event.set()  # its loop ends at its next wait


class JobTrainController(TrainController):
    """Ray's controller, polling every POLL_INTERVAL_S unless the user set Ray's variable, and
    at once when rank 0 says a report is coming; with Ray's preemption watcher in the
    controller's process (PreemptionWatcherInProcess)."""

    # The runtime-env path is taken on clusters only.
    worker_group_cls: type[WorkerGroup] = ClusterWorkerGroup

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if HEALTH_CHECK_INTERVAL_S_ENV_VAR not in os.environ:
            self._health_check_interval_s = POLL_INTERVAL_S
        # Ray gives its controller this in its runtime env (here: set for either kind): it
        # blocks its event loop on purpose. This process hosts the controller alone.
        os.environ.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, "0")
        callbacks = self._worker_group_callbacks_to_propagate
        for i, callback in enumerate(callbacks):
            if type(callback) is PreemptionCallback:  # Ray adds it unless turned off
                callbacks[i] = PreemptionWatcherInProcess()
        self._report_coming = asyncio.Event()

    async def report_coming(self) -> None:
        """Rank 0 calls this as each epoch's report starts (orchestrator/context.py)."""
        self._report_coming.set()

    async def _poll_workers(self):
        # A Ray Train worker holds one report until a poll takes it, and its next report waits
        # for that: with epochs shorter than the poll interval every epoch waited for a poll
        # (mlp_tabular's 80 epochs of ~0.05 s: 18 s of its 22 s loop). So the wait between
        # polls ends early when rank 0 says a report is coming; the poll then takes the
        # previous report, if still held, and the new one goes through without waiting.
        remaining = self._health_check_interval_s - (time_monotonic() - self._latest_poll_time)
        if remaining > 0:
            try:
                await asyncio.wait_for(self._report_coming.wait(), remaining)
            except asyncio.TimeoutError:
                pass
            else:
                if self.get_state().is_terminal():  # as Ray's own wait does: aborted meanwhile
                    ray.actor.exit_actor()
                self._latest_poll_time = float("-inf")  # Ray's wait is over too
        self._report_coming.clear()
        return await super()._poll_workers()


class TrainControllerWithoutRuntimeEnv(JobTrainController):
    """The embedded cluster's controller, starting `WorkerGroupWithoutRuntimeEnv`s."""

    worker_group_cls = WorkerGroupWithoutRuntimeEnv


class ClusterTrainControllerWithoutRuntimeEnv(JobTrainController):
    """A joined cluster's controller when there are no settings to carry."""

    worker_group_cls = ClusterWorkerGroupWithoutRuntimeEnv
