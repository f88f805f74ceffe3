"""Where the loop runs: inside a Ray Train worker, or in this one process.

The loop talks to its surroundings only through a `WorkerContext`: who am I (rank, world
size, device), is there a checkpoint to resume from, report an epoch (with a checkpoint on
rank 0), and send a progress event to whoever is watching. Under Ray, rank 0 also sends its
metrics to the driver through `mailbox` (mailbox.py). `LocalContext` makes the loop runnable
and debuggable without Ray; `RayContext` is what Ray Train workers use.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from orchestrator import checkpoint


class WorkerContext(Protocol):
    rank: int
    world_size: int
    device: torch.device
    mailbox: Any  # a mailbox.Mailbox to the driver, or None (rank 0 then logs to MLflow itself)

    def latest_checkpoint(self) -> dict[str, Any] | None: ...

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None: ...

    def progress(self, event: dict[str, Any]) -> None: ...


class LocalContext:
    """One process, no Ray. Checkpoints go to `checkpoint_dir` (latest only) when given."""

    rank = 0
    world_size = 1
    mailbox = None

    def __init__(self, device: str = "cpu", checkpoint_dir: str | None = None, on_progress=None):
        self.device = torch.device(device)
        self.checkpoint_dir = checkpoint_dir
        self.on_progress = on_progress
        self.reports: list[dict[str, float]] = []

    def latest_checkpoint(self):
        if self.checkpoint_dir and os.path.exists(
            os.path.join(self.checkpoint_dir, checkpoint.META_FILE)
        ):
            return checkpoint.load(self.checkpoint_dir)
        return None

    def report(self, metrics, state):
        self.reports.append(dict(metrics))
        if state is not None and self.checkpoint_dir:
            checkpoint.save(state, self.checkpoint_dir)

    def progress(self, event):
        if self.on_progress:
            self.on_progress(event)


class RayContext:
    """Inside a Ray Train V2 worker. Every rank must call `report` the same number of times."""

    def __init__(self, mailbox=None) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.mailbox = mailbox
        self.checkpoint_note: str | None = None  # set when the latest checkpoint was unusable
        # Rank 0 tells the controller when a report is coming, so that it polls then rather
        # than at its next interval (orchestrator/controller.py, JobTrainController; Ray's own
        # controller has no such method, and is then not told).
        self._report_coming = None
        if self.rank == 0:
            from ray.train.v2._internal.execution.context import get_train_context

            controller = get_train_context().controller_actor
            self._report_coming = getattr(controller, "report_coming", None)

    def latest_checkpoint(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as path:
            state, used, problems = checkpoint.load_newest_intact(path)
        if problems:  # said once, by rank 0, in the driver's output and the resumed event
            self.checkpoint_note = f"skipped {'; '.join(problems)}; resumed from {used.name}"
        return state

    def report(self, metrics, state):
        import ray.train

        with _checkpoint_dir(state) as path:
            ckpt = ray.train.Checkpoint.from_directory(path) if path else None
            if self._report_coming is not None:
                self._report_coming.remote()
            ray.train.report(metrics, checkpoint=ckpt)

    def progress(self, event):
        if self.mailbox is None or self.rank != 0:
            return
        if event.get("type") == "outcome":
            self.mailbox.send(event)  # the driver needs this one to set the run status
            return
        # Fire and forget: training never waits for a round trip to the mailbox, and a tick is
        # dropped if the driver falls behind. The loop sends a few a second at most.
        self.mailbox.post(event)


def node_tags(ctx: RayContext) -> dict[str, str]:
    """The run's tags naming the node each rank runs on (`workers.nodes`, `workers.num_nodes`),
    so a reviewer sees how the job was spread over the cluster, and what the workers trained on
    (`workers.device`: rank 0's device, with the GPU's name; `workers.backend`: the process
    group's, nccl on GPUs, gloo on CPUs). Every rank must call this: the node names are
    gathered with one collective. Rank 0's loop sends them with its first metrics (again after
    a restart, when the placement may have changed)."""
    import ray
    import torch.distributed as dist

    here = ray.get_runtime_context()
    mine = f"{ray.util.get_node_ip_address()} (node {here.get_node_id()[:8]})"
    nodes: list[Any] = [mine]
    backend = "none (one process)"
    if dist.is_available() and dist.is_initialized():
        nodes = [None] * ctx.world_size
        dist.all_gather_object(nodes, mine)
        backend = str(dist.get_backend())
    device = ctx.device
    if device.type == "cuda":
        device_name = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        device_name = str(device)
    return {
        "workers.nodes": ", ".join(f"rank {r}: {n}" for r, n in enumerate(nodes)),
        "workers.num_nodes": str(len(set(nodes))),
        "workers.device": device_name,
        "workers.backend": backend,
    }


@contextmanager
def _checkpoint_dir(state):
    if state is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="ckpt-") as path:
        checkpoint.save(state, path)
        yield path
