"""The training loop every worker runs: setup → epochs → steps → eval → checkpoint → report.

It receives the resolved config as a plain dict and a `WorkerContext` (Ray worker or this
process), so the same code runs under Ray Train and, for tests and debugging, alone:

    python -m orchestrator.loop job=mlp_tabular trainer.max_epochs=3

Determinism: every epoch reseeds torch from (seed, epoch, rank), and the sampler shuffles
from (seed, epoch). Same seed and worker count ⇒ same metrics, and a run resumed from an
epoch checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from orchestrator import shared_data
from orchestrator.context import WorkerContext
from orchestrator.job import EpochEnd, JobSpec, job_config, load_job
from orchestrator.tracking import (
    UNDELIVERED_METRICS,
    MetricLogger,
    NullMetricLogger,
    RelayedMetricLogger,
)

# The most often rank 0 sends a step event to the progress display: a few a second is plenty.
STEP_EVENT_INTERVAL_S = 0.2


@dataclass
class LoopResult:
    status: str  # "finished" | "nonfinite"
    epoch: int  # epochs completed
    step: int  # optimizer steps taken
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""


# --- Building blocks ------------------------------------------------------------------------


def build_optimizer(params, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    if cfg["name"] == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg["lr"],
            momentum=cfg["momentum"],
            nesterov=cfg["nesterov"],
            weight_decay=cfg["weight_decay"],
        )
    return torch.optim.AdamW(
        params, lr=cfg["lr"], betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"]
    )


def lr_factor(step: int, total_steps: int, warmup_steps: int, name: str, min_ratio: float) -> float:
    """Multiplier on optim.lr at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, cfg: dict[str, Any], steps_per_epoch: int, epochs: int):
    total = steps_per_epoch * epochs
    warmup = round(cfg["warmup_epochs"] * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg["name"], cfg["min_lr_ratio"])
    )


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    mixed = (seed * 1_000_003 + epoch * 10_007 + rank) % 2**31
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def evaluate(
    job: JobSpec, model: nn.Module, loader: DataLoader, device, autocast, limit: int = 0
) -> dict[str, float]:
    """Means of the job's per-sample eval values over the whole held-out set (all shards)."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad(), autocast():
        for i, batch in enumerate(loader):
            if limit and i == limit:
                break
            values = job.eval_step(model, to_device(batch, device))
            for key, v in values.items():
                sums[key] = sums.get(key, 0) + v.detach().double().sum()
            count += len(next(iter(values.values())))
    keys = sorted(sums)
    packed = torch.stack(
        [torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys] + [count]
    )
    packed = all_reduce_sum(packed)
    total = packed[-1].item()
    model.train()
    return {f"val/{k}": packed[i].item() / max(total, 1) for i, k in enumerate(keys)}


def _rank0_evaluate(
    job: JobSpec, model: nn.Module, splits, jcfg, epoch: int, epochs: int, device, artifacts
) -> dict[str, float]:
    """The job's own evaluation hook; it observes the model in eval mode, never trains it."""
    model.eval()
    try:
        with torch.no_grad():
            return job.evaluate(EpochEnd(model, splits, jcfg, epoch, epochs, device, artifacts))  # type: ignore[misc]
    finally:
        model.train()


def _metric_logger(
    uri: str, ctx: WorkerContext, run_id: str | None, run_dir: str | None, tags
) -> MetricLogger | RelayedMetricLogger | NullMetricLogger:
    """Rank 0 logs: under Ray through the driver, which holds the MLflow client (workers then
    need none: ~90 MiB less on rank 0); in one process without Ray, with its own client."""
    if not run_id or ctx.rank != 0:
        return NullMetricLogger()
    if ctx.mailbox is not None:
        return RelayedMetricLogger(ctx.mailbox, tags)
    spill = os.path.join(run_dir, UNDELIVERED_METRICS) if run_dir else None
    return MetricLogger(uri, run_id, spill_path=spill, tags=tags)


# --- The loop -------------------------------------------------------------------------------


def run(
    cfg: dict[str, Any],
    ctx: WorkerContext,
    run_id: str | None = None,
    entered_at: float | None = None,
    tags: dict[str, str] | None = None,
    shared: dict[str, Any] | None = None,
) -> LoopResult:
    """Train as `cfg` says. `run_id`: the MLflow run rank 0 logs to, with `tags` added;
    `entered_at`: when the worker process entered its entry point (start-up phases);
    `shared`: the splits and reference scores built once for all workers (shared_data.py),
    instead of building them here."""
    loop_started = time.perf_counter()
    # Start-up phases, in seconds since `orchestrate` started, logged with the first step as
    # startup/<phase>_s: where the time to the first step goes (benchmarks/performance.py).
    started_at = cfg.get("launch", {}).get("started_at")
    phases: dict[str, float] = {}

    def phase(name: str, at: float | None = None) -> None:
        if started_at is not None:
            phases[f"startup/{name}_s"] = (at or time.time()) - started_at

    if fit_called_at := cfg.get("launch", {}).get("fit_called_at"):
        phase("fit_called", fit_called_at)  # the driver handed the job to Ray Train
    if entered_at:
        phase("worker_entered", entered_at)  # worker group up, process group initialised
    tcfg = cfg["trainer"]
    seed = cfg["seed"]
    torch.set_num_threads(tcfg["threads_per_worker"] or max(1, int(tcfg["cpus_per_worker"])))
    # A job may load `models:/name@alias` (fine-tuning): resolve it against this job's store.
    os.environ["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_REGISTRY_URI"] = cfg["tracking"]["uri"]
    job = load_job(cfg["job"]["name"])
    jcfg = job_config(job, cfg["job"])
    device = ctx.device

    run_dir = cfg.get("launch", {}).get("run_dir")  # the run's checkpoint storage, if local
    metrics_out = _metric_logger(cfg["tracking"]["uri"], ctx, run_id, run_dir, tags)
    # Setup: data (built once for all workers, or here: deterministic either way), model,
    # optimizer, schedule.
    seed_everything(seed, 0, 0)  # same initial weights on every rank (DDP also broadcasts them)
    phase("job_loaded")
    splits = shared_data.fetch(shared, "splits") if shared else job.build_data(jcfg)
    phase("data_built")
    model = job.build_model(jcfg, splits).to(device)
    sampler: DistributedSampler = DistributedSampler(
        splits.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed
    )
    # On a GPU, batches in page-locked memory: to_device's non-blocking copies then overlap
    # the device's work instead of waiting for the host to stage them.
    pin = device.type == "cuda"
    train_loader = DataLoader(
        splits.train, batch_size=tcfg["batch_size"], sampler=sampler, pin_memory=pin
    )
    val_shard = Subset(splits.val, range(ctx.rank, len(splits.val), ctx.world_size))  # type: ignore[arg-type]
    val_loader = DataLoader(val_shard, batch_size=max(256, tcfg["batch_size"]), pin_memory=pin)
    accum = tcfg["grad_accum_steps"]
    n_batches = min(len(train_loader), tcfg["limit_batches"] or len(train_loader))
    steps_per_epoch = math.ceil(n_batches / accum)
    optimizer = build_optimizer(model.parameters(), cfg["optim"])
    scheduler = build_scheduler(optimizer, cfg["sched"], steps_per_epoch, tcfg["max_epochs"])
    use_bf16 = tcfg["precision"] == "bf16"
    # Weight EMA (buffers such as batch-norm statistics averaged too); identical on every rank.
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tcfg["ema_decay"]), use_buffers=True)
        if tcfg["ema_decay"]
        else None
    )

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)

    # Resume: the latest checkpoint Ray hands back after a restart (or the local one).
    start_epoch, global_step = 0, 0
    state = ctx.latest_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, global_step = state["epoch"], state["global_step"]
        note = getattr(ctx, "checkpoint_note", None)  # a corrupt latest checkpoint was skipped
        ctx.progress({"type": "resumed", "epoch": start_epoch, "step": global_step, "note": note})

    ddp = DistributedDataParallel(model) if ctx.world_size > 1 else model
    # Compiled for the training steps only: evaluation, the EMA and checkpoints use the module
    # itself, so state-dict keys do not change with trainer.compile.
    step_model = cast(nn.Module, torch.compile(ddp)) if tcfg["compile"] else ddp
    if run_dir:  # once set up: a fault drill that kills this pid hits the training itself
        _record_process(run_dir, ctx.rank)
    phase("model_built")
    # Rank 0's reference scores (baseline/*, at step 0). Built here, they are computed now;
    # built beside the driver (shared), they are logged by the first check that finds them
    # ready (here, then at each epoch end) and waited for only as the loop returns: a slow
    # baseline (ssm_selective_copy's: ~20 s) no longer holds every rank back from the first step.
    # Only for a run to log them to: without one (`python -m orchestrator.loop`) they are noise.
    references_pending = job.references is not None and ctx.rank == 0 and run_id is not None

    def log_references(wait: bool) -> None:
        nonlocal references_pending
        if not references_pending or (
            shared and not wait and not shared_data.ready(shared, "references")
        ):
            return
        assert job.references is not None  # pending only for a job that has them
        scores = shared_data.fetch(shared, "references") if shared else job.references(jcfg, splits)
        metrics_out.log({f"baseline/{k}": v for k, v in scores.items()}, step=0)
        references_pending = False

    log_references(wait=not shared)  # computed here: now; from the builder: if already done
    phase("references_done")
    clip = tcfg["grad_clip"]  # 0: off
    params = [p for p in model.parameters() if p.requires_grad]
    last: dict[str, float] = {}
    next_step_event = 0.0  # monotonic time after which rank 0 sends the next step event

    def log_windows(windows: list[torch.Tensor], logged: list[tuple[int, float, int]], extra):
        """Reduce every rank's loss windows of this epoch in one collective and log them as
        train/loss at their own steps and times; returns `extra`, reduced alongside."""
        reduced = all_reduce_sum(torch.stack([extra, *windows]))
        for (step, lr, at), (total, n) in zip(logged, reduced[1:].tolist(), strict=True):
            metrics_out.log({"train/loss": total / n, "train/lr": lr}, step=step, timestamp_ms=at)
        return reduced[0]

    # The last optimizer step's (finite?, loss, grad norm, epoch, step), checked one step later:
    # reading a GPU value on the host waits for the device to finish it, and right after the
    # norm that would empty the device's queue before every optimizer step. A step later the
    # norm is long computed and the next step's work is queued behind it. A non-finite step's
    # update is applied before the run stops: it stops before the next one, and no checkpoint,
    # evaluation or model is made from it (the epoch's end checks first).
    pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int] | None = None

    def stop_if_nonfinite(windows, logged, epoch_loss) -> LoopResult | None:
        if pending is None or bool(pending[0]):
            return None
        _, bad_loss, bad_norm, bad_epoch, bad_step = pending
        log_windows(windows, logged, epoch_loss)  # every rank is here: safe to reduce
        log_references(wait=True)
        metrics_out.flush()
        msg = (
            f"non-finite loss or gradient (loss={bad_loss.item():.4g}, grad norm={bad_norm.item():.4g}) "
            f"at epoch {bad_epoch + 1}, step {bad_step + 1}: lower optim.lr or set trainer.grad_clip"
        )
        result = LoopResult("nonfinite", bad_epoch, bad_step, last, msg)
        ctx.progress({"type": "outcome", **result.__dict__})
        return result

    for epoch in range(start_epoch, tcfg["max_epochs"]):
        seed_everything(seed, epoch + 1, ctx.rank)
        sampler.set_epoch(epoch)
        ddp.train()
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros(
            2, dtype=torch.float64, device=device
        )  # [sum, batches] this log window
        epoch_loss = torch.zeros(2, dtype=torch.float64, device=device)
        # Logged steps' windows, kept on the device until the epoch ends: no collective and
        # no host sync per logged step (MLflow receives them at the epoch's flush either way).
        windows: list[torch.Tensor] = []
        logged: list[tuple[int, float, int]] = []  # (step, lr, time in ms) per window
        samples = 0
        n_micro = min(len(train_loader), tcfg["limit_batches"] or len(train_loader))
        for micro, batch in enumerate(train_loader):
            if micro == n_micro:
                break
            batch = to_device(batch, device)
            sync = (micro + 1) % accum == 0 or micro + 1 == n_micro
            # The last group of an epoch may be short: average over the micro-batches it has.
            group = accum if micro < n_micro - n_micro % accum else n_micro % accum
            # Accumulation: skip DDP's gradient all-reduce on all but the last micro-batch.
            no_sync = (
                ddp.no_sync()
                if (not sync and isinstance(ddp, DistributedDataParallel))
                else nullcontext()
            )
            with no_sync:
                with autocast():
                    loss = job.training_step(step_model, batch)
                (loss / group).backward()
            loss_sum += torch.stack(
                [loss.detach().double(), torch.ones((), dtype=torch.float64, device=device)]
            )
            samples += len(job.model_input(batch))
            if not sync:
                continue
            # Gradients are identical on every rank after the all-reduce, so every rank sees
            # the same norm and stops together on NaN/inf, without an extra collective.
            # Without clipping, only the norm: clip_grad_norm_ would also scale every gradient
            # by 1, a second pass over them (benchmarks/NOTES.md, "Improvements made").
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(params, clip)
                if clip
                else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            )
            if stopped := stop_if_nonfinite(windows, logged, epoch_loss):
                return stopped
            pending = (torch.isfinite(grad_norm), loss.detach(), grad_norm, epoch, global_step)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(model)
            global_step += 1
            if global_step == 1 and started_at is not None:
                phase("time_to_first_step")
                metrics_out.log(phases, step=0)
            if global_step % tcfg["log_every_n_steps"] == 0:
                lr = scheduler.get_last_lr()[0]
                windows.append(loss_sum.clone())
                logged.append((global_step, lr, int(time.time() * 1000)))
                epoch_loss += loss_sum
                if ctx.rank == 0 and time.monotonic() >= next_step_event:
                    next_step_event = time.monotonic() + STEP_EVENT_INTERVAL_S
                    ctx.progress(
                        {
                            "type": "step",
                            "epoch": epoch + 1,
                            "epochs": tcfg["max_epochs"],
                            "step": global_step,
                            "steps_per_epoch": steps_per_epoch,
                            "loss": (loss_sum[0] / loss_sum[1]).item(),  # rank 0's, for display
                            "lr": lr,
                        }
                    )
                loss_sum.zero_()

        if stopped := stop_if_nonfinite(windows, logged, epoch_loss):
            return stopped
        epoch_loss = log_windows(windows, logged, epoch_loss + loss_sum)
        evaluated = ema.module if ema is not None else model  # what is evaluated and deployed
        seconds = time.perf_counter() - epoch_start
        total_samples = all_reduce_sum(torch.tensor(float(samples), device=device)).item()
        last = {
            "train/loss_epoch": (epoch_loss[0] / epoch_loss[1]).item(),
            **evaluate(job, evaluated, val_loader, device, autocast, tcfg["limit_batches"]),
            "train/samples_per_s": total_samples / seconds,
            "train/epoch_time_s": seconds,
            "epoch": epoch + 1,
        }
        if job.evaluate is not None and ctx.rank == 0:
            last.update(
                _rank0_evaluate(
                    job, evaluated, splits, jcfg, epoch + 1, tcfg["max_epochs"], device, metrics_out
                )
            )
        metrics_out.log(last, step=global_step)
        log_references(wait=False)
        metrics_out.flush()
        state = None
        if ctx.rank == 0:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                **({"ema": ema.state_dict()} if ema is not None else {}),
                "epoch": epoch + 1,
                "global_step": global_step,
                "torch_rng": torch.get_rng_state(),
            }
        ctx.report(last, state)
        ctx.progress(
            {
                "type": "epoch",
                "epoch": epoch + 1,
                "epochs": tcfg["max_epochs"],
                "step": global_step,
                "metrics": last,
                "main_metric": job.main_metric,
            }
        )

    log_references(wait=True)
    # Wall time inside this function (setup included), to tell orchestration overhead apart.
    metrics_out.log({"time/loop_s": time.perf_counter() - loop_started}, step=global_step)
    # Relayed, the driver waits out a tracking outage (the workers are free meanwhile).
    delivered = metrics_out.flush()
    give_up_at = time.monotonic() + cfg["tracking"]["outage_wait_s"]
    while not delivered and time.monotonic() < give_up_at:  # the server may be restarting
        time.sleep(2)
        delivered = metrics_out.flush()
    result = LoopResult("finished", tcfg["max_epochs"], global_step, last)
    if not delivered:  # training is done and checkpointed; only the tracking server is missing
        where = (
            "rank 0's last metrics did not reach the driver"
            if isinstance(metrics_out, RelayedMetricLogger)
            else f"undelivered metrics kept in {os.path.join(str(run_dir), UNDELIVERED_METRICS)}"
        )
        result.message = f"MLflow unreachable: {where}"
    ctx.progress({"type": "outcome", **result.__dict__})
    return result


def _record_process(run_dir: str, rank: int) -> None:
    """`<run dir>/workers/rank-<r>.json`: which process is which rank, for an operator who
    wants to inspect one (py-spy) or kill one in a fault drill (tests/test_faults.py does)."""
    import json
    import socket

    folder = os.path.join(run_dir, "workers")
    os.makedirs(folder, exist_ok=True)
    info = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    tmp = os.path.join(folder, f".rank-{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, os.path.join(folder, f"rank-{rank}.json"))


def ray_train_fn(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker."""
    entered_at = time.time()
    from orchestrator.context import RayContext, node_tags

    ctx = RayContext(config.get("mailbox"))
    tags = node_tags(ctx)
    run(config["cfg"], ctx, config.get("run_id"), entered_at, tags, config.get("shared"))


if __name__ == "__main__":  # single-process debugging without Ray or tracking
    import sys

    from orchestrator.cli import compose_config
    from orchestrator.context import LocalContext

    cfg = compose_config(sys.argv[1:])
    use_gpu = cfg["trainer"]["use_gpu"]  # None: the GPU when there is one, as orchestrate does
    gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    outcome = run(
        cfg,
        LocalContext(
            device="cuda" if gpu else "cpu",
            on_progress=lambda e: e["type"] == "epoch" and print(e["metrics"], flush=True),
        ),
    )
    print(outcome.status, outcome.metrics)
