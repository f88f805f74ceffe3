"""The configuration schema: the only place defaults live.

YAML under `conf/` only sets values over these dataclasses; Hydra rejects unknown keys and
wrong types while composing. `validate()` adds the cross-field and range checks Hydra cannot
express, each raising a `UserError` that names the key and the fix.

Each job contributes its own dataclass (subclass of `JobConfig`) for the `job.*` node; it is
registered under the hidden group `schema/job` and referenced from `conf/job/<name>.yaml`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from orchestrator.errors import UserError

OPTIMIZERS = ("sgd", "adamw")
SEARCHES = ("random", "grid", "optuna")
SCHEDULERS = ("fifo", "asha")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")
# Ray's placement-group strategies for the worker group (ScalingConfig.placement_strategy).
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class JobConfig:
    """Fields every job has. A job's own dataclass subclasses this."""

    name: str = MISSING
    # Seed of the fixed held-out split; separate from `seed` so that changing the training
    # seed never changes which samples are held out.
    split_seed: int = 0


@dataclass
class TrainerConfig:
    num_workers: int = 2
    max_epochs: int = 10
    batch_size: int = 64  # per worker
    use_gpu: bool | None = None  # None = use GPUs when the cluster has them
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False  # torch.compile the training steps (the first ones pay for compiling)
    grad_accum_steps: int = 1
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    # Exponential moving average of the weights, updated every optimizer step; when on, it is
    # what evaluation sees and what is logged as the model (generative models gain the most).
    ema_decay: float = 0.0  # 0 = off; e.g. 0.999
    max_failures: int = 0  # worker-group restarts from the latest checkpoint
    cpus_per_worker: float = 1.0
    log_every_n_steps: int = 10
    limit_batches: int = 0  # train and evaluate on at most this many batches per epoch; 0 = all
    # Torch intra-op threads per worker; 0 = cpus_per_worker. Oversubscribed threads are
    # the classic way to make CPU DDP slower than one process.
    threads_per_worker: int = 0
    # How Ray places the workers: PACK (Ray's default) fills a node first; SPREAD puts them on
    # different nodes when it can; STRICT_SPREAD insists (one worker per node, or no start).
    placement_strategy: str = "PACK"


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only


@dataclass
class SchedConfig:
    name: str = "cosine"
    warmup_epochs: float = 0.0  # linear warmup from 0, in (fractional) epochs
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of optim.lr


@dataclass
class ClusterConfig:
    # None: start an embedded Ray on this machine, bound to loopback.
    # "auto", "host:6379" or "ray://host:10001": connect to an existing cluster.
    address: str | None = None
    num_cpus: int | None = None  # embedded Ray only; None = all cores of this machine
    # Where checkpoints go. None = ./outputs/ray under the working directory. Must be
    # reachable from every node on a multi-node cluster.
    storage_path: str | None = None
    show_worker_logs: bool = False  # forward worker stdout/stderr (Ray's chatter included)


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "orchestrator"
    run_name: str | None = None  # None = job name plus the key overrides
    register_as: str | None = None  # registered-model name; None = log, don't register
    alias: str = "champion"  # alias given to the newly registered version
    log_model: bool = True
    # When training ends while the tracking server is unreachable, rank 0 keeps retrying the
    # undelivered metrics this long before leaving them on disk for `orchestrate resume=<id>`.
    outage_wait_s: float = 60.0


@dataclass
class SweepConfig:
    """Used with `orchestrate -m`: the search space comes from sweep overrides such as
    optim.lr='tag(log,interval(1e-4,1e-1))' or trainer.batch_size=32,64."""

    num_samples: int = 8  # trials to sample (random/optuna); grid runs every combination once
    search: str = "random"  # random | grid | optuna (TPE)
    scheduler: str = "fifo"  # fifo | asha (early stopping by epoch)
    metric: str | None = None  # None = the job's main metric
    mode: str | None = None  # min | max; None = the job's main metric's mode
    max_concurrent: int | None = None  # None = what the cluster can place at once
    grace_period: int = 1  # asha: epochs every trial gets before it may be stopped
    reduction_factor: int = 3  # asha: keep the best 1/reduction_factor at each rung
    resume: str | None = None  # parent MLflow run id of an interrupted sweep to continue
    # The space, written in config (conf/sweep/*.yaml): key -> expression in the same grammar,
    # e.g. {"optim.lr": "tag(log,interval(1e-4,1e-1))"}. Sweep overrides on the command line
    # add dimensions or replace these.
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class Config:
    job: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 0


def register_schemas(job_schemas: dict[str, type]) -> None:
    """Put the root schema and the given job schemas into Hydra's ConfigStore."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    for name, schema in job_schemas.items():
        store.store(group="schema/job", name=name, node=schema)


def check_known_keys(cfg: dict[str, Any], job_schema: type) -> None:
    """Reject keys the schema doesn't have, including ones added with Hydra's `+key=value`."""
    sections: dict[str, Any] = {
        f.name: f.default_factory
        for f in dataclasses.fields(Config)
        if f.default_factory is not dataclasses.MISSING
    }
    sections["job"] = job_schema
    _check_fields(cfg, Config, "")
    for name, schema in sections.items():
        _check_fields(cfg[name], schema, f"{name}.")


def _check_fields(values: dict[str, Any], schema: Any, prefix: str) -> None:
    known = [f.name for f in dataclasses.fields(schema)]
    for key in values:
        if key not in known:
            raise UserError(
                f"{prefix}{key}",
                "unknown key",
                f"valid keys under {prefix.rstrip('.') or 'the root'}: {', '.join(known)}",
            )


def _require(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise UserError(key, problem, fix)


def validate(cfg: dict[str, Any]) -> None:
    """Range and cross-field checks on the resolved config (types were checked by Hydra)."""
    t, o, s = cfg["trainer"], cfg["optim"], cfg["sched"]
    for key in ("num_workers", "max_epochs", "batch_size", "grad_accum_steps"):
        _require(
            t[key] >= 1,
            f"trainer.{key}",
            f"must be at least 1, got {t[key]}",
            f"set trainer.{key}=1 or more",
        )
    _require(
        t["max_failures"] >= 0,
        "trainer.max_failures",
        f"must be 0 or more, got {t['max_failures']}",
        "set trainer.max_failures=0 to disable restarts",
    )
    _require(
        t["cpus_per_worker"] > 0,
        "trainer.cpus_per_worker",
        f"must be positive, got {t['cpus_per_worker']}",
        "set trainer.cpus_per_worker=1",
    )
    _require(
        0 <= t["ema_decay"] < 1,
        "trainer.ema_decay",
        f"must be in [0, 1), got {t['ema_decay']}",
        "set trainer.ema_decay=0.999 or 0 (off)",
    )
    _require(
        t["grad_clip"] >= 0,
        "trainer.grad_clip",
        f"must be 0 (off) or positive, got {t['grad_clip']}",
        "set trainer.grad_clip=1.0 or 0",
    )
    _require(
        t["limit_batches"] >= 0,
        "trainer.limit_batches",
        f"must be 0 (all) or more, got {t['limit_batches']}",
        "set trainer.limit_batches=0",
    )
    _require(
        t["log_every_n_steps"] >= 1,
        "trainer.log_every_n_steps",
        f"must be at least 1, got {t['log_every_n_steps']}",
        "set trainer.log_every_n_steps=10",
    )
    _require(
        t["threads_per_worker"] >= 0,
        "trainer.threads_per_worker",
        f"must be 0 (auto) or more, got {t['threads_per_worker']}",
        "set trainer.threads_per_worker=0",
    )
    _require(
        t["precision"] in PRECISIONS,
        "trainer.precision",
        f"unknown precision '{t['precision']}'",
        f"choose one of: {', '.join(PRECISIONS)}",
    )
    _require(
        t["placement_strategy"] in PLACEMENT_STRATEGIES,
        "trainer.placement_strategy",
        f"unknown placement strategy '{t['placement_strategy']}'",
        f"choose one of: {', '.join(PLACEMENT_STRATEGIES)}",
    )
    _require(
        o["name"] in OPTIMIZERS,
        "optim.name",
        f"unknown optimizer '{o['name']}'",
        f"choose one of: {', '.join(OPTIMIZERS)}",
    )
    _require(o["lr"] > 0, "optim.lr", f"must be positive, got {o['lr']}", "set e.g. optim.lr=1e-3")
    _require(
        o["weight_decay"] >= 0,
        "optim.weight_decay",
        f"must be 0 or more, got {o['weight_decay']}",
        "set optim.weight_decay=0",
    )
    _require(
        0 <= o["momentum"] < 1,
        "optim.momentum",
        f"must be in [0, 1), got {o['momentum']}",
        "set optim.momentum=0.9",
    )
    _require(
        len(o["betas"]) == 2 and all(0 <= b < 1 for b in o["betas"]),
        "optim.betas",
        f"must be two numbers in [0, 1), got {o['betas']}",
        "set optim.betas=[0.9,0.999]",
    )
    _require(
        s["name"] in SCHEDULES,
        "sched.name",
        f"unknown schedule '{s['name']}'",
        f"choose one of: {', '.join(SCHEDULES)}",
    )
    _require(
        0 <= s["warmup_epochs"] <= t["max_epochs"],
        "sched.warmup_epochs",
        f"must be between 0 and trainer.max_epochs ({t['max_epochs']}), got {s['warmup_epochs']}",
        "lower sched.warmup_epochs",
    )
    _require(
        0 <= s["min_lr_ratio"] <= 1,
        "sched.min_lr_ratio",
        f"must be in [0, 1], got {s['min_lr_ratio']}",
        "set sched.min_lr_ratio=0",
    )
    c = cfg["cluster"]
    _require(
        c["num_cpus"] is None or c["num_cpus"] >= 1,
        "cluster.num_cpus",
        f"must be at least 1, got {c['num_cpus']}",
        "leave cluster.num_cpus unset to use every core",
    )
    sw = cfg["sweep"]
    _require(
        sw["search"] in SEARCHES,
        "sweep.search",
        f"unknown search '{sw['search']}'",
        f"choose one of: {', '.join(SEARCHES)}",
    )
    _require(
        sw["scheduler"] in SCHEDULERS,
        "sweep.scheduler",
        f"unknown scheduler '{sw['scheduler']}'",
        f"choose one of: {', '.join(SCHEDULERS)}",
    )
    _require(
        sw["mode"] in (None, "min", "max"),
        "sweep.mode",
        f"must be min or max, got {sw['mode']}",
        "set sweep.mode=max or leave it unset",
    )
    for key in ("num_samples", "grace_period", "reduction_factor"):
        _require(
            sw[key] >= 1,
            f"sweep.{key}",
            f"must be at least 1, got {sw[key]}",
            f"set sweep.{key}=1 or more",
        )
    _require(
        sw["max_concurrent"] is None or sw["max_concurrent"] >= 1,
        "sweep.max_concurrent",
        f"must be at least 1, got {sw['max_concurrent']}",
        "leave it unset to fill the cluster",
    )
    tr = cfg["tracking"]
    _require(
        bool(tr["experiment"].strip()),
        "tracking.experiment",
        "must not be empty",
        "set tracking.experiment=<name>",
    )
    _require(
        bool(tr["alias"].strip()),
        "tracking.alias",
        "must not be empty",
        "set tracking.alias=champion",
    )
    _require(
        tr["outage_wait_s"] >= 0,
        "tracking.outage_wait_s",
        f"must be >= 0, got {tr['outage_wait_s']}",
        "set e.g. tracking.outage_wait_s=60",
    )
