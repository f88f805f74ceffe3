"""How a run's workers form their torch process group, without torch in the controller.

Ray's `TorchConfig` and its backend live in `ray.train.torch.config`, which imports torch at the
top. The config travels to Ray Train's controller actor (its backend starts the group from
there), so that process imported torch only to send the workers functions defined beside it:
1.4 s of CPU on this machine's 2 cores (`import ray.train.torch.config` in a fresh interpreter),
on the path to the first step while every core is busy starting the run's other processes.

`ProcessGroupConfig` is the same configuration from a module that imports no torch. Its backend
does what Ray's does for the backends a run here uses (gloo on CPU, NCCL on GPU, rendezvous
through environment variables) and sends the workers functions of this module, which import
Ray's torch helpers there, where torch is needed anyway. With `loopback=True` (the embedded
cluster) rank 0 first binds its rendezvous store to 127.0.0.1 (orchestrator/loopback.py).

Private Ray API (2.60) used here: `_setup_torch_process_group`, `_set_torch_distributed_env_vars`
and `_shutdown_torch` from `ray.train.torch.config`, and `get_address_and_port`. The tests
run a real fit with this config and check that its controller imported no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
from ray._private import ray_constants
from ray.exceptions import GetTimeoutError
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import (
    DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
    TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
)
from ray.train.v2._internal.util import TrainingFramework

# --- run in each worker, where torch is imported anyway -------------------------------------


def _prepare_worker(master_addr: str, master_port: int, loopback: bool) -> None:
    """Where rank 0's rendezvous store is, and torch's usual RANK/LOCAL_RANK/... variables
    (Ray's three calls in one round trip)."""
    from ray.train.torch.config import _set_torch_distributed_env_vars

    from orchestrator.loopback import bind_rendezvous_to_loopback

    os.environ["MASTER_ADDR"] = master_addr
    os.environ["MASTER_PORT"] = str(master_port)
    _set_torch_distributed_env_vars()
    if loopback:
        bind_rendezvous_to_loopback()


def _init_process_group(**kwargs) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(**kwargs)


def _destroy_process_group(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


def _torch_config_context():
    """The context Ray's TorchConfig wraps the training function in (sets the CUDA device)."""
    from ray.train.torch.config import TorchConfigContextManager

    return TorchConfigContextManager()


# --- run in the controller ------------------------------------------------------------------


class ProcessGroupBackend(Backend):
    """Ray's `_TorchBackend` for gloo and NCCL with `env://` rendezvous."""

    share_cuda_visible_devices = True  # as Ray's: every GPU of the node visible to each worker

    def on_start(self, worker_group, backend_config) -> None:  # a ProcessGroupConfig
        backend = backend_config.backend
        if backend is None:
            gpus = worker_group.get_resources_per_worker().get("GPU", 0)
            backend = "nccl" if gpus > 0 else "gloo"
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(
            _prepare_worker, master_addr=addr, master_port=port, loopback=backend_config.loopback
        )
        size = len(worker_group)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _init_process_group,
                    backend=backend,
                    world_rank=rank,
                    world_size=size,
                    init_method="env://",
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(size)
            ]
        )

    def on_shutdown(self, worker_group, backend_config) -> None:
        futures = worker_group.execute_async(
            _destroy_process_group, destroy_process_group=len(worker_group) > 1
        )
        timeout_s = ray_constants.env_integer(
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
        )
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            pass  # as Ray's: the workers are being stopped anyway


@dataclass
class ProcessGroupConfig(BackendConfig):
    """Ray's `TorchConfig` fields for a run here; `backend` None picks NCCL on GPU workers,
    gloo otherwise, as Ray does. `loopback`: rank 0's rendezvous store on 127.0.0.1 only."""

    backend: str | None = None
    timeout_s: int = 1800
    loopback: bool = False

    @property
    def backend_cls(self):
        return ProcessGroupBackend

    @property
    def train_func_context(self):
        return _torch_config_context

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}
