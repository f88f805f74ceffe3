"""The only module that talks to Ray: start or join a cluster, run a TorchTrainer on it.

Ray is imported lazily: the embedded cluster's loopback-only binding is decided by an
environment variable Ray reads at import time, and a bad config must fail before Ray
costs anything.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError

# Ray only binds its servers to 127.0.0.1 (instead of the machine's network address) when it
# believes it runs on a laptop OS; this switch, read at `import ray`, asks for exactly that.
_LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Only for the embedded cluster, which lives and dies with this process on this machine: no
# cloud can preempt it (the preemption watcher is one more actor process per run) and nothing
# scrapes its Prometheus metrics. Each process saved is ~1 s of start-up on a small machine.
# Every process of the embedded Ray inherits these (no runtime env needed: trainers.py).
_EMBEDDED_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


@dataclass
class ClusterResources:
    cpus: float
    gpus: float
    nodes: int = 1


def embedded_resources(cluster: dict[str, Any]) -> ClusterResources:
    """What an embedded Ray would have, known before starting it."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ClusterResources(float(cluster["num_cpus"] or os.cpu_count() or 1), float(gpus))


def _is_loopback(address: str | None) -> bool:
    if address is None:
        return True
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        address = canonicalize_bootstrap_address("auto") or ""
    host = address.removeprefix("ray://").rpartition(":")[0]
    return host in ("localhost", "::1") or host.startswith("127.")


def connect(cluster: dict[str, Any], state_api: bool = False) -> ClusterResources:
    """Start the embedded Ray (cluster.address unset) or join an existing cluster.

    `state_api`: start the embedded Ray's dashboard (on 127.0.0.1 only). Sweeps need it: a
    trial the scheduler stops ends by killing its Train controller, and Ray Train frees that run's
    worker placement group through a cleaner that asks the State API — which lives in the
    dashboard. Without it the freed CPUs never come back and the sweep hangs (seen on 2 CPUs).
    """
    if _is_loopback(cluster["address"]):
        # Set before `import ray` for the processes an embedded Ray starts; and on the
        # already-imported constant for this driver, which must also see itself as 127.0.0.1
        # to find a loopback-only raylet (otherwise it looks for one at the machine's IP).
        os.environ.setdefault(_LOOPBACK_ONLY, "0")
        import ray._private.ray_constants as ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    import ray

    if ray.is_initialized():
        return current_resources()
    common = dict(
        log_to_driver=cluster["show_worker_logs"],
        logging_level=logging.INFO if cluster["show_worker_logs"] else logging.ERROR,
        # Workers and the driver share this machine's Python environment (or, on a remote
        # cluster, the image's), so nothing needs shipping here; remote submission
        # carries code through the Jobs API instead.
    )
    if cluster["address"] is None:
        for key, value in _EMBEDDED_ENV.items():
            os.environ.setdefault(key, value)  # inherited by the processes the embedded Ray starts
        from orchestrator.loopback import loopback_interface

        # gloo binds where the hostname resolves (often the LAN address) unless told otherwise.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
        # address="local": always a fresh embedded instance, never a `ray start` cluster
        # that happens to run on this machine.
        _private_temp_dir()
        ray.init(
            address="local",
            num_cpus=cluster["num_cpus"] or os.cpu_count(),
            include_dashboard=state_api,
            dashboard_host="127.0.0.1",
            **common,
        )
        # Processes inside the cluster that look "their" cluster up (Ray Train's placement-
        # group cleaner does, via the State API) read this file under RAY_TMPDIR.
        ray._private.utils.write_ray_address(ray.get_runtime_context().gcs_address)
    else:
        try:
            # No job-wide runtime env: an actor or task with one cannot use the idle worker
            # processes Ray keeps ready (see trainers.py, which sets the controller's poll).
            ray.init(address=cluster["address"], **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(
                "cluster.address",
                f"cannot join Ray cluster at '{cluster['address']}' ({_first_line(exc)})",
                "start the cluster (`ray start --head`) or fix cluster.address",
            ) from None
    return current_resources()


def check_state_api() -> None:
    """Sweeps need the cluster's State API (see `connect`); without it they hang, so refuse."""
    import ray
    from ray.util.state import list_nodes

    try:
        # The cluster's own address: left to guess, the State API picks whichever Ray was
        # started last on this machine.
        address = ray.get_runtime_context().gcs_address
        list_nodes(address=address, limit=1, timeout=10, raise_on_missing_output=False)
    except Exception as exc:
        raise UserError(
            "cluster.address",
            f"the cluster's Ray State API does not answer ({_first_line(exc)}); without it Ray Train "
            "cannot free the resources of trials the scheduler stops, and the sweep would hang",
            "start the head with its dashboard (the default of `ray start --head`)",
        ) from None


_OWN_TEMP_DIR: str | None = None


def _private_temp_dir() -> None:
    """Give the embedded Ray a temp dir of its own (inherited by all its processes). Ray finds
    "the current cluster" through a file in its temp dir; shared with other Ray instances on
    the machine, that file names whichever started last, and Ray Train's cleaner then queries
    the wrong cluster and never frees a stopped sweep trial's CPUs."""
    global _OWN_TEMP_DIR
    if "RAY_TMPDIR" not in os.environ:
        import tempfile

        # Short: Ray's unix socket paths live under it and must stay under ~100 characters.
        _OWN_TEMP_DIR = tempfile.mkdtemp(prefix="orc-", dir="/tmp")
        os.environ["RAY_TMPDIR"] = _OWN_TEMP_DIR


def current_resources() -> ClusterResources:
    import ray

    total = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    return ClusterResources(total.get("CPU", 0.0), total.get("GPU", 0.0), nodes)


def check_placeable(trainer: dict[str, Any], use_gpu: bool, res: ClusterResources) -> None:
    """Fail now, not after minutes of waiting, when the workers can never all be placed."""
    need_cpu = trainer["num_workers"] * trainer["cpus_per_worker"]
    if need_cpu > res.cpus:
        raise UserError(
            "trainer.num_workers",
            f"{trainer['num_workers']} workers × {trainer['cpus_per_worker']:g} CPU need {need_cpu:g} CPUs "
            f"but the cluster has {res.cpus:g}",
            f"use trainer.num_workers<={int(res.cpus // trainer['cpus_per_worker'])} or a bigger cluster",
        )
    if use_gpu and trainer["num_workers"] > res.gpus:
        raise UserError(
            "trainer.use_gpu",
            f"{trainer['num_workers']} GPU workers but the cluster has {res.gpus:g} GPUs",
            "set trainer.use_gpu=false or lower trainer.num_workers",
        )
    if trainer["placement_strategy"] == "STRICT_SPREAD" and trainer["num_workers"] > res.nodes:
        raise UserError(
            "trainer.placement_strategy",
            f"STRICT_SPREAD puts each of the {trainer['num_workers']} workers on its own node "
            f"but the cluster has {res.nodes} node{'s' if res.nodes != 1 else ''}",
            "use trainer.placement_strategy=SPREAD or more nodes",
        )


def check_storage_shared(storage_path: str, timeout_s: float = 120.0) -> None:
    """On a multi-node cluster, prove that every other node sees `storage_path` (Ray Train 2.7+
    writes checkpoints from each worker's node straight to it, and restarts read them back on
    any node). The driver writes a marker with a random token; a 0-CPU task pinned to each
    other node reads it back. A node-local path fails here, in seconds, instead of at the
    first checkpoint. Object-store URIs (s3://, gs://, ...) are shared by construction.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from orchestrator import storage

    if storage.is_remote_uri(storage_path):
        return
    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    if not others:
        return
    marker, token = storage.write_marker(storage_path)
    probe = ray.remote(num_cpus=0, max_retries=0)(storage.sees_marker)
    try:
        refs = {
            n["NodeManagerAddress"]: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker), token)
            for n in others
        }
        try:
            seen = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s), strict=True))
        except ray.exceptions.GetTimeoutError:
            # A node too busy to run a tiny task is no proof either way: go on, say so.
            print(
                f"warning: could not verify within {timeout_s:.0f}s that every node can reach "
                f"cluster.storage_path={storage_path}",
                flush=True,
            )
            return
    finally:
        marker.unlink(missing_ok=True)
    blind = sorted(address for address, ok in seen.items() if not ok)
    if blind:
        raise storage.not_shared_error(storage_path, blind, len(others))


def make_mailbox(name: str | None = None):
    """Rank 0's channel to the driver (progress, outcome, metrics): see mailbox.py."""
    from orchestrator.mailbox import Mailbox

    return Mailbox(name=name)


def fit(
    cfg: dict[str, Any],
    run_id: str | None,
    use_gpu: bool,
    storage_path: str,
    name: str,
    mailbox,
    callbacks: list | None = None,
    shared: dict[str, Any] | None = None,
    box: dict[str, Any] | None = None,
) -> Any:
    """Run the job's workers to completion. Returns Ray's Result; raises on training failure.

    `callbacks` are Ray Train controller callbacks (a sweep trial passes Tune's reporter).
    `shared` is `shared_data.start`'s refs when the caller already started them (a sweep
    whose trials all train on the same data); by default this run builds its own.
    `box`: where the trainer is kept while it runs (`fit_in_background`'s, for `end_train_run`).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from orchestrator import shared_data
    from orchestrator.loop import ray_train_fn
    from orchestrator.process_group import ProcessGroupConfig
    from orchestrator.trainers import trainer_class

    t = cfg["trainer"]
    cfg = {**cfg, "launch": {**cfg.get("launch", {}), "fit_called_at": time.time()}}
    embedded = cfg["cluster"]["address"] is None
    # A sweep trial (it brings Tune's callback) keeps Ray's placement-group cleaner: a stopped
    # trial ends by killing its controller (`end_train_run`; see trainers.py).
    trainer = trainer_class(embedded, sweep_trial=callbacks is not None)(
        ray_train_fn,
        train_loop_config={
            "cfg": cfg,
            "run_id": run_id,
            "mailbox": mailbox,
            # Built while Ray Train starts its workers, once for all of them.
            "shared": shared if shared is not None else shared_data.start(cfg),
        },
        # gloo on CPU, NCCL on GPU: set explicitly so the choice is visible, not inferred. The
        # embedded cluster keeps DDP's rendezvous store on 127.0.0.1 too (see loopback.py).
        torch_config=ProcessGroupConfig(backend="nccl" if use_gpu else "gloo", loopback=embedded),
        scaling_config=ScalingConfig(
            num_workers=t["num_workers"],
            use_gpu=use_gpu,
            resources_per_worker={"CPU": t["cpus_per_worker"], **({"GPU": 1} if use_gpu else {})},
            placement_strategy=t["placement_strategy"],
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=t["max_failures"]),
            # Keep two: the newest, and the one before it in case the newest is damaged.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    if box is not None:
        box["trainer"] = trainer
    return trainer.fit()


def fit_in_background(*args, **kwargs) -> tuple[threading.Thread, dict[str, Any]]:
    """Run `fit` in a daemon thread so the main thread stays free for progress and signals."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = fit(*args, **kwargs, box=box)
        except BaseException as exc:  # handed to the main thread, which decides what it means
            box["error"] = exc

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    return thread, box


def end_train_run(thread: threading.Thread, box: dict[str, Any], wait_s: float = 30) -> None:
    """End the run `fit_in_background` started, at once, as Tune ends a trial it kills: its Ray
    Train controller is killed, its workers die with it (their owner), and Ray Train's
    placement-group cleaner frees their resources. Returns once `fit` has returned (it raises
    into the box), or after `wait_s`."""
    import ray

    give_up_at = time.monotonic() + wait_s
    while thread.is_alive() and time.monotonic() < give_up_at:
        controller = getattr(box.get("trainer"), "controller", None)
        if controller is None:  # not started yet: kill it as soon as it is
            time.sleep(0.1)
            continue
        ray.kill(controller)
        thread.join(max(0.0, give_up_at - time.monotonic()))


def run_tasks(fn, shards: list, files: Path) -> list:
    """fn(local copy of `files`, shard) for each shard, as Ray tasks of 1 CPU, results in order.

    The folder travels through the object store (once), so tasks on any node can read it.
    """
    import ray

    blob = ray.put(
        {str(p.relative_to(files)): p.read_bytes() for p in files.rglob("*") if p.is_file()}
    )

    @ray.remote(num_cpus=1)
    def task(contents: dict[str, bytes], shard):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for rel, data in contents.items():
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / rel).write_bytes(data)
            return fn(tmp, shard)

    return ray.get([task.remote(blob, shard) for shard in shards])


def shutdown() -> None:
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if _OWN_TEMP_DIR is not None:  # Ray's session logs of the embedded cluster
        import shutil

        shutil.rmtree(_OWN_TEMP_DIR, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
