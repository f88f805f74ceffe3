"""Performance against hand-written DDP (issue #7): B1–B6 in one command, as ratios.

    .venv/bin/python benchmarks/performance.py [--repeats 5] [--trials 16,64] [--only B1,B2]
    .venv/bin/python benchmarks/performance.py --tiny     # seconds-long smoke run (a test runs it)

Every figure is a ratio measured in this one run: the orchestrated side (`orchestrate`, a real
subprocess) and the baseline (benchmarks/torchrun_baseline.py under `torchrun`) are run
alternately, A B then B A, `--repeats` times; the table gives the median ratio and its min–max.
Both sides pin one intra-op thread per worker (trainer.threads_per_worker=1, OMP_NUM_THREADS=1
and torch.set_num_threads(1)). Orchestrated figures are read back with MlflowClient:
train/samples_per_s per epoch, the timestamp of startup/time_to_first_step_s, time/loop_s.

  B1 steady-state samples/s (median of epochs after the first), cnn_digits, 1 and 2 workers,
     on a running Ray head (cluster.address=<head>) vs torchrun; a third side runs the torchrun
     script's own loop under a plain Ray Train TorchTrainer on that head
     (benchmarks/raytrain_baseline.py), which splits the gap into Ray Train's share and ours
  B2 time from launch to the first optimizer step and total wall of a short job (2 workers,
     5 batches, model logged as by default): cold (embedded Ray) and warm (running head)
  B3 1 → 2 worker scaling efficiency, thr(2) / (2 · thr(1)), on transformer_lm (compute-bound)
     vs torchrun's own; ratio = ours / torchrun's
  B4 tracking cost: samples/s with train metrics logged every step (trainer.log_every_n_steps=1)
     vs per-step logging off (log_every_n_steps larger than the run); epoch metrics, logged
     outside the timed epoch, are the same on both sides
  B5 sweep overhead per trial (trial run wall − time/loop_s), for each --trials count, tiny
     cnn_digits trials on an embedded Ray; and within each sweep, the overhead of its last
     quarter of trials (by start) over its first quarter (no run-to-run drift in that one)
  B6 peak RSS (sampled every 0.2 s) of the driver and of each worker in B2's cold runs vs the
     torchrun launcher and its workers

A private Ray head (own RAY_TMPDIR, stopped by its session's processes, never `ray stop`)
serves the warm runs. Writes performance.json and performance.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
BASELINE = str(HERE / "torchrun_baseline.py")
RAYTRAIN = str(HERE / "raytrain_baseline.py")
PINNED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The start-up phases a run logs as startup/<phase>_s, in order.
PHASES = ("fit_called", "worker_entered", "data_built", "model_built", "time_to_first_step")


# --- processes ------------------------------------------------------------------------------


class RssSampler:
    """Peak RSS per process of a process tree, sampled in a thread until stopped."""

    def __init__(self, pid: int, worker_marker: str, interval: float = 0.2):
        self.root, self.marker, self.interval = pid, worker_marker, interval
        self.peak: dict[int, float] = {}
        self.workers: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.root)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            for p in procs:
                try:
                    rss = p.memory_info().rss / 2**20
                    if p.pid != self.root and self.marker in " ".join(p.cmdline()):
                        self.workers.add(p.pid)  # Ray renames its worker processes once in use
                except psutil.Error:
                    continue
                self.peak[p.pid] = max(rss, self.peak.get(p.pid, 0.0))
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        return {
            "driver_mb": self.peak.get(self.root, 0.0),
            "workers_mb": sorted(self.peak[p] for p in self.workers),
            "all_processes_mb": sum(self.peak.values()),
            "processes": len(self.peak),
        }


def launch(cmd: list[str], cwd: Path, env: dict[str, str], marker: str | None = None) -> dict:
    """Run to completion; returns wall, output, the launch timestamp and (optionally) RSS."""
    started = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    sampler = RssSampler(proc.pid, marker) if marker else None
    try:
        out, _ = proc.communicate(timeout=1800)
    except BaseException:  # stopped or timed out: stop the child too (orchestrate ends its run)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    wall = time.perf_counter() - t0
    rss = sampler.stop() if sampler else None
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-4000:]}")
    return {"wall_s": wall, "launched_at": started, "out": out, "rss": rss}


def environment() -> dict[str, str]:
    env = {**os.environ, **PINNED}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(var, None)
    return env


def orchestrate(cfg: Settings, overrides: list[str], address: str | None, rss: bool = False):
    args = [*overrides, "trainer.threads_per_worker=1"]
    if address:
        args.append(f"cluster.address={address}")
    r = launch([str(BIN / "orchestrate"), *args], cfg.workdir, environment(),
               "RayTrainWorker" if rss else None)  # fmt: skip
    m = re.search(r"MLflow run ([0-9a-f]{32})", r["out"])
    if not m:
        raise SystemExit(f"no MLflow run id in the output of orchestrate {' '.join(args)}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cfg.workdir / 'mlflow.db'}")
    run_id = m.group(1)
    rates = [x.value for x in sorted(client.get_metric_history(run_id, "train/samples_per_s"),
                                     key=lambda x: x.step)]  # fmt: skip
    (first,) = client.get_metric_history(run_id, "startup/time_to_first_step_s")
    run = client.get_run(run_id)  # one read: metrics, phases and start time
    metrics = run.data.metrics
    # Seconds since orchestrate's main() started, per start-up phase (orchestrator/loop.py).
    phases = {p: metrics[f"startup/{p}_s"] for p in PHASES if f"startup/{p}_s" in metrics}
    return {
        "samples_per_s": rates,
        # The metric's timestamp is when rank 0 logged it, right after the first step.
        "first_step_s": first.timestamp / 1000 - r["launched_at"],
        "logged_time_to_first_step_s": first.value,
        # Start-up split: launch → orchestrate's main() (interpreter, CLI imports) → MLflow
        # run created (config, job import, Ray started or joined) → first step (worker group,
        # process group, data, model, first batch).
        "main_started_s": first.timestamp / 1000 - first.value - r["launched_at"],
        "run_created_s": run.info.start_time / 1000 - r["launched_at"],
        "loop_s": metrics.get("time/loop_s"),
        "phases": phases,
        "wall_s": r["wall_s"],
        "rss": r["rss"],
    }


def torchrun(cfg: Settings, workers: int, args: list[str], rss: bool = False) -> dict:
    attempts = 4
    for attempt in range(1, attempts + 1):
        launched = f"{time.time():.6f}"
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={workers}", BASELINE,
               *args, "--launch-ts", launched]  # fmt: skip
        try:
            r = launch(cmd, cfg.workdir, environment(), "torchrun_baseline.py" if rss else None)
            break
        except SystemExit as failed:
            # Seen in B2 runs, twice in a row once: rank 0 aborted in gloo's teardown after its
            # result line ("terminate called without an active exception"). A rerun beats
            # losing the run.
            if attempt == attempts:
                raise
            print(f"  torchrun baseline failed, running it again: {str(failed)[:200]}", flush=True)
    return {**baseline_result(r["out"]), "wall_s": r["wall_s"], "rss": r["rss"]}


def raytrain(cfg: Settings, workers: int, args: list[str]) -> dict:
    """The torchrun baseline's training code under a plain Ray Train TorchTrainer, on the
    same head as the orchestrated runs: the share of a gap that is Ray Train's own."""
    cmd = [str(BIN / "python"), RAYTRAIN, f"--workers={workers}", f"--address={cfg.head}",
           "--", *args, "--launch-ts", f"{time.time():.6f}"]  # fmt: skip
    r = launch(cmd, cfg.workdir, environment())
    return {**baseline_result(r["out"]), "wall_s": r["wall_s"]}


def baseline_result(out: str) -> dict:
    """The `BASELINE_RESULT {json}` line both baselines print (rank 0's figures)."""
    line = next(ln for ln in out.splitlines() if ln.startswith("BASELINE_RESULT "))
    return json.loads(line.split(" ", 1)[1])


def steady(rates: list[float]) -> float:
    """Steady state: the median epoch after the first (which pays warm-up)."""
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def ratios(ours: list[float], theirs: list[float]) -> dict[str, Any]:
    """summary() of the pairwise ratios of two sides' figures, repeat by repeat."""
    return summary([a / b for a, b in zip(ours, theirs, strict=True)])


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def alternate(cfg: Settings, name: str, sides: list, summarize) -> Any:
    """Run each side once per repeat, order reversed every other repeat (A B, B A, ...).

    After every repeat the figures so far are summarised and written (marked with the repeats
    done), so a run stopped early still leaves what it measured."""
    results: list[list] = [[] for _ in sides]
    for rep in range(cfg.repeats):
        order = list(range(len(sides)))
        if rep % 2:
            order.reverse()
        for i in order:
            results[i].append(sides[i]())
        print(f"  {name}: repeat {rep + 1}/{cfg.repeats} done", flush=True)
        cfg.publish(name, {**summarize(*results), "repeats_done": rep + 1})
    return summarize(*results)


# --- the benchmarks -------------------------------------------------------------------------


class Settings:
    def __init__(self, args: argparse.Namespace, workdir: Path, head: str | None):
        self.repeats, self.tiny, self.workdir, self.head = args.repeats, args.tiny, workdir, head
        self.trials = [int(t) for t in args.trials.split(",")]
        self.cnn_epochs = 2 if args.tiny else 6
        self.lm_batches = 3 if args.tiny else 30
        self.publish = lambda name, figures: None  # set by main(): store and write


def b1(cfg: Settings) -> dict:
    sides = []
    for w in (1, 2):
        limit = ["trainer.limit_batches=3"] if cfg.tiny else []
        ours = ["job=cnn_digits", f"trainer.num_workers={w}", "tracking.log_model=false",
                f"trainer.max_epochs={cfg.cnn_epochs}", *limit]  # fmt: skip
        base = ["--job", "cnn_digits", "--epochs", str(cfg.cnn_epochs),
                *(["--limit-batches", "3"] if cfg.tiny else [])]  # fmt: skip
        sides += [lambda ours=ours: orchestrate(cfg, ours, cfg.head),
                  lambda w=w, base=base: torchrun(cfg, w, base),
                  lambda w=w, base=base: raytrain(cfg, w, base)]  # fmt: skip

    def summarize(o1, t1, r1, o2, t2, r2) -> dict:
        out = {}
        for w, ours, base, ray_train in ((1, o1, t1, r1), (2, o2, t2, r2)):
            o = [steady(r["samples_per_s"]) for r in ours]
            b = [steady(r["samples_per_s"]) for r in base]
            rt = [steady(r["samples_per_s"]) for r in ray_train]
            out[f"{w}_workers"] = {
                "ratio": ratios(o, b),
                "orchestrate_samples_per_s": summary(o),
                "torchrun_samples_per_s": summary(b),
                # The same hand-written loop under plain Ray Train: Ray's share of the gap.
                "raytrain_samples_per_s": summary(rt),
                "raytrain_ratio": ratios(rt, b),
                "orchestrate_vs_raytrain": ratios(o, rt),
            }
        return out

    return alternate(cfg, "B1", sides, summarize)


def b2_b6(cfg: Settings) -> dict:
    short = ["job=cnn_digits", "trainer.num_workers=2", "trainer.max_epochs=1",
             "trainer.limit_batches=5"]  # fmt: skip
    sides = [
        lambda: orchestrate(cfg, short, None, rss=True),
        lambda: orchestrate(cfg, short, cfg.head),
        lambda: torchrun(cfg, 2, ["--job", "cnn_digits", "--epochs", "1", "--limit-batches", "5"],
                         rss=True),
    ]  # fmt: skip

    def summarize(cold, warm, base) -> dict:
        b2: dict[str, Any] = {}
        for name, runs in (("cold", cold), ("warm", warm)):
            b2[name] = {
                "first_step_ratio": summary([
                    o["first_step_s"] / b["first_step_s"] for o, b in zip(runs, base, strict=True)]),
                "wall_ratio": summary([o["wall_s"] / b["wall_s"] for o, b in zip(runs, base, strict=True)]),
                "first_step_s": summary([o["first_step_s"] for o in runs]),
                # From `orchestrate`'s main() to the first step, as logged to the run: the rest of
                # first_step_s is the interpreter starting and importing the CLI.
                "logged_time_to_first_step_s": summary([o["logged_time_to_first_step_s"] for o in runs]),
                "wall_s": summary([o["wall_s"] for o in runs]),
                "main_started_s": summary([o["main_started_s"] for o in runs]),
                "run_created_s": summary([o["run_created_s"] for o in runs]),
                "phases_s": {p: summary([o["phases"][p] for o in runs])
                             for p in PHASES if all(p in o["phases"] for o in runs)},
            }  # fmt: skip
        b2["torchrun"] = {
            "first_step_s": summary([b["first_step_s"] for b in base]),
            "wall_s": summary([b["wall_s"] for b in base]),
        }
        ours = [r["rss"] for r in cold]
        theirs = [r["rss"] for r in base]

        def ratio(key, pick=lambda v: v):
            return summary([pick(o[key]) / pick(t[key]) for o, t in zip(ours, theirs, strict=True)])

        b6 = {
            "driver_ratio": ratio("driver_mb"),
            "worker_ratio": ratio("workers_mb", max),
            "all_processes_ratio": ratio("all_processes_mb"),
            "orchestrate": {
                "driver_mb": summary([o["driver_mb"] for o in ours]),
                "worker_max_mb": summary([max(o["workers_mb"]) for o in ours]),
                "all_processes_mb": summary([o["all_processes_mb"] for o in ours]),
                "processes": summary([o["processes"] for o in ours]),
            },
            "torchrun": {
                "launcher_mb": summary([t["driver_mb"] for t in theirs]),
                "worker_max_mb": summary([max(t["workers_mb"]) for t in theirs]),
                "all_processes_mb": summary([t["all_processes_mb"] for t in theirs]),
                "worker_ru_maxrss_mb": summary([max(b["peak_rss_mb"]) for b in base]),
            },
        }
        return {"B2": b2, "B6": b6}

    return alternate(cfg, "B2", sides, summarize)


def b3(cfg: Settings) -> dict:
    lm = ["job=transformer_lm", "job.max_chars=300000", "trainer.max_epochs=3",
          f"trainer.limit_batches={cfg.lm_batches}", "tracking.log_model=false"]  # fmt: skip
    base = ["--job", "transformer_lm", "--max-chars", "300000", "--epochs", "3",
            "--limit-batches", str(cfg.lm_batches)]  # fmt: skip
    sides = [
        lambda: orchestrate(cfg, [*lm, "trainer.num_workers=1"], cfg.head),
        lambda: torchrun(cfg, 1, base),
        lambda: orchestrate(cfg, [*lm, "trainer.num_workers=2"], cfg.head),
        lambda: torchrun(cfg, 2, base),
    ]  # fmt: skip

    def summarize(o1, t1, o2, t2) -> dict:
        def eff(one, two):
            return [steady(b["samples_per_s"]) / (2 * steady(a["samples_per_s"]))
                    for a, b in zip(one, two, strict=True)]  # fmt: skip

        ours, theirs = eff(o1, o2), eff(t1, t2)
        return {
            "efficiency_ratio": ratios(ours, theirs),
            "orchestrate_efficiency": summary(ours),
            "torchrun_efficiency": summary(theirs),
            "orchestrate_samples_per_s": {"1": summary([steady(r["samples_per_s"]) for r in o1]),
                                          "2": summary([steady(r["samples_per_s"]) for r in o2])},
            "torchrun_samples_per_s": {"1": summary([steady(r["samples_per_s"]) for r in t1]),
                                       "2": summary([steady(r["samples_per_s"]) for r in t2])},
        }  # fmt: skip

    return alternate(cfg, "B3", sides, summarize)


def b4(cfg: Settings) -> dict:
    common = ["job=cnn_digits", "trainer.num_workers=2", f"trainer.max_epochs={cfg.cnn_epochs}",
              "tracking.log_model=false", *(["trainer.limit_batches=3"] if cfg.tiny else [])]  # fmt: skip
    sides = [
        lambda: orchestrate(cfg, [*common, "trainer.log_every_n_steps=1"], cfg.head),
        lambda: orchestrate(cfg, [*common, "trainer.log_every_n_steps=1000000000"], cfg.head),
    ]  # fmt: skip

    def summarize(every, off) -> dict:
        e, f = (
            [steady(r["samples_per_s"]) for r in every],
            [steady(r["samples_per_s"]) for r in off],
        )
        return {
            "ratio": ratios(e, f),
            "every_step_samples_per_s": summary(e),
            "off_samples_per_s": summary(f),
        }

    return alternate(cfg, "B4", sides, summarize)


def start_order_trend(overhead: list[float]) -> dict:
    """Within one sweep (no run-to-run drift): does a trial's overhead grow with the trials
    before it? Least-squares slope against start order, and last quarter / first quarter."""
    if len(overhead) < 4:
        return {}
    k = len(overhead) // 4
    first, last = statistics.median(overhead[:k]), statistics.median(overhead[-k:])
    slope = statistics.linear_regression(range(len(overhead)), overhead).slope
    return {"slope_s_per_trial": slope, "first_quarter_s": first, "last_quarter_s": last,
            "last_over_first": last / first, "seq_s": [round(x, 2) for x in overhead]}  # fmt: skip


def b5(cfg: Settings) -> dict:
    from mlflow.tracking import MlflowClient

    out = {}
    for n in cfg.trials:
        with tempfile.TemporaryDirectory(prefix="perf-sweep-") as tmp:
            args = ["-m", "job=cnn_digits", "trainer.num_workers=1", "trainer.max_epochs=1",
                    "trainer.limit_batches=2", "trainer.threads_per_worker=1",
                    "optim.lr=tag(log,interval(1e-4,1e-1))", f"sweep.num_samples={n}",
                    "tracking.log_model=false"]  # fmt: skip
            r = launch([str(BIN / "orchestrate"), *args], Path(tmp), environment())
            client = MlflowClient(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
            exp = client.get_experiment_by_name("orchestrator")
            runs = client.search_runs([exp.experiment_id], max_results=10_000)
            trials = [x for x in runs if x.data.tags.get("mlflow.parentRunId")]
            timed = sorted(
                (x for x in trials if "time/loop_s" in x.data.metrics and x.info.end_time),
                key=lambda x: x.info.start_time,
            )  # in the order the trials started
            overhead = [(x.info.end_time - x.info.start_time) / 1000 - x.data.metrics["time/loop_s"]
                        for x in timed]  # fmt: skip
            if not overhead:
                raise SystemExit(f"B5: none of the {len(trials)} trials logged time/loop_s")
            q = statistics.quantiles(overhead, n=4) if len(overhead) > 1 else overhead * 3
            out[str(n)] = {
                "trials": len(trials),
                "overhead_per_trial_s": {"median": statistics.median(overhead), "q1": q[0],
                                         "q3": q[2], "min": min(overhead), "max": max(overhead)},
                "sweep_wall_s": r["wall_s"],
                "sweep_wall_per_trial_s": r["wall_s"] / n,
                "by_start_order": start_order_trend(overhead),
            }  # fmt: skip
        print(f"  sweep of {n} trials done", flush=True)
    if len(cfg.trials) > 1:
        lo, hi = out[str(cfg.trials[0])], out[str(cfg.trials[-1])]
        out["growth"] = hi["overhead_per_trial_s"]["median"] / lo["overhead_per_trial_s"]["median"]
    return out


# --- a private Ray head for the warm runs ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(attempts: int = 3) -> tuple[str, str]:
    """A loopback Ray head in its own RAY_TMPDIR; returns (address, session directory)."""
    for attempt in range(1, attempts + 1):
        port, tmp = _free_port(), tempfile.mkdtemp(prefix="orc-perf-", dir="/tmp")
        env = {**environment(), "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": tmp,
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}  # fmt: skip
        started = subprocess.run(
            [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={_free_port()}", "--disable-usage-stats",
             # Not the default 52365: every embedded Ray started beside a head holding it (the
             # cold runs) waited ~4 s longer in ray.init (measured 2.6–3.6 s → 6.6–7.9 s).
             f"--dashboard-agent-listen-port={_free_port()}"],
            env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        for p in psutil.process_iter(["name", "cmdline"]):
            cmd = p.info["cmdline"] or []
            if (
                started.returncode == 0
                and p.info["name"] == "gcs_server"
                and f"--gcs_server_port={port}" in cmd
            ):
                log_dir = next(a for a in cmd if a.startswith("--log_dir=")).split("=", 1)[1]
                return f"127.0.0.1:{port}", log_dir.rsplit("/logs", 1)[0]
        # Seen on a loaded machine: the raylet failing a check at start-up. Stop what did
        # start (found by its private temp dir) and try again on fresh ports.
        stop_head(tmp)
        print(
            f"ray start --head failed (attempt {attempt}): {started.stderr.strip()[-300:]}",
            flush=True,
        )
    raise SystemExit(f"ray start --head failed {attempts} times")


def stop_head(session: str) -> None:
    """Stop exactly this head's processes (`ray stop` would stop every Ray on the machine)."""
    # Never this process or its parents, whose command line may name the session too.
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    roots = [p for p in psutil.process_iter(["cmdline"])
             if p.pid not in mine and session in " ".join(p.info["cmdline"] or [])]  # fmt: skip
    procs = {q.pid: q for p in roots for q in [p, *p.children(recursive=True)]}
    for q in procs.values():
        try:
            q.terminate()
        except psutil.Error:
            pass
    # Most exit within a second; the GCS and the autoscaler monitor can outlive SIGTERM by more
    # than 15 s (measured). The head is thrown away: kill what is left.
    _, alive = psutil.wait_procs(list(procs.values()), timeout=3)
    for q in alive:
        try:
            q.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)  # until reaped, so nothing of the head is listed after


# --- the table ------------------------------------------------------------------------------


def fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f}, n={s['n']})"


def table(r: dict) -> list[str]:
    rows = ["| id | figure | ratio: median (min–max) | target | absolute: orchestrate / baseline |",
            "|---|---|---|---|---|"]  # fmt: skip
    if "B1" in r:
        for w in ("1", "2"):
            x = r["B1"][f"{w}_workers"]
            rows.append(f"| B1 | samples/s, cnn_digits, {w} worker(s), orchestrate / torchrun | "
                        f"{fmt(x['ratio'])} | ≥ 0.98 | {x['orchestrate_samples_per_s']['median']:.0f}"
                        f" / {x['torchrun_samples_per_s']['median']:.0f} samples/s |")  # fmt: skip
            if "raytrain_ratio" in x:
                rows.append(f"| B1 | same, the torchrun script's loop under plain Ray Train / torchrun | "
                            f"{fmt(x['raytrain_ratio'])} | — | {x['raytrain_samples_per_s']['median']:.0f}"
                            f" / {x['torchrun_samples_per_s']['median']:.0f} samples/s |")  # fmt: skip
                rows.append(f"| B1 | same, orchestrate / plain Ray Train (our share of the gap) | "
                            f"{fmt(x['orchestrate_vs_raytrain'])} | — | |")  # fmt: skip
    if "B2" in r:
        t = r["B2"]["torchrun"]
        for k in ("cold", "warm"):
            x = r["B2"][k]
            rows.append(f"| B2 | launch → first optimizer step, {k}, orchestrate / torchrun | "
                        f"{fmt(x['first_step_ratio'])} | ≤ 2 | {x['first_step_s']['median']:.1f} / "
                        f"{t['first_step_s']['median']:.1f} s |")  # fmt: skip
            rows.append(f"| B2 | start-up split, {k}: launch → main() → MLflow run (Ray up) → "
                        f"first step | — | — | {x['main_started_s']['median']:.1f} → "
                        f"{x['run_created_s']['median']:.1f} → {x['first_step_s']['median']:.1f} s |")  # fmt: skip
            if x.get("phases_s"):
                steps = " → ".join(
                    f"{p.replace('_', ' ')} {v['median']:.1f}" for p, v in x["phases_s"].items()
                )
                rows.append(f"| B2 | worker-side split, {k} (s since main()): {steps} | — | — | |")
            rows.append(f"| B2 | total wall, short job, {k}, orchestrate / torchrun | "
                        f"{fmt(x['wall_ratio'])} | — | {x['wall_s']['median']:.1f} / "
                        f"{t['wall_s']['median']:.1f} s |")  # fmt: skip
    if "B3" in r:
        x = r["B3"]
        rows.append(f"| B3 | 1 → 2 worker efficiency, transformer_lm, ours / torchrun's | "
                    f"{fmt(x['efficiency_ratio'])} | ≥ 0.98 | {x['orchestrate_efficiency']['median']:.2f}"
                    f" / {x['torchrun_efficiency']['median']:.2f} |")  # fmt: skip
    if "B4" in r:
        x = r["B4"]
        rows.append(f"| B4 | samples/s, metrics every step / per-step logging off (cnn_digits, 2 "
                    f"workers) | {fmt(x['ratio'], 3)} | ≥ 0.99 | {x['every_step_samples_per_s']['median']:.0f}"
                    f" / {x['off_samples_per_s']['median']:.0f} samples/s |")  # fmt: skip
    if "B5" in r:
        for n, x in r["B5"].items():
            if n == "growth":
                continue
            o = x["overhead_per_trial_s"]
            rows.append(f"| B5 | sweep overhead per trial, {n} trials (s, median, IQR) | "
                        f"{o['median']:.1f} s ({o['q1']:.1f}–{o['q3']:.1f}) | flat | "
                        f"sweep wall {x['sweep_wall_s']:.0f} s, {x['sweep_wall_per_trial_s']:.1f} s/trial |")  # fmt: skip
        if "growth" in r["B5"]:
            rows.append(f"| B5 | overhead per trial, most / fewest trials | {r['B5']['growth']:.2f} "
                        f"| ≈ 1 | |")  # fmt: skip
        for n, x in r["B5"].items():
            t = x.get("by_start_order") if n != "growth" else None
            if t:
                rows.append(f"| B5 | within the {n}-trial sweep: last quarter of trials / first "
                            f"quarter (by start) | {t['last_over_first']:.2f} | ≈ 1 | "
                            f"{t['last_quarter_s']:.1f} / {t['first_quarter_s']:.1f} s; slope "
                            f"{t['slope_s_per_trial']:+.3f} s per trial |")  # fmt: skip
    if "B6" in r:
        x, o, t = r["B6"], r["B6"]["orchestrate"], r["B6"]["torchrun"]
        rows.append(f"| B6 | peak RSS, driver / torchrun launcher | {fmt(x['driver_ratio'])} | ≤ 1.2 | "
                    f"{o['driver_mb']['median']:.0f} / {t['launcher_mb']['median']:.0f} MiB |")  # fmt: skip
        rows.append(f"| B6 | peak RSS, largest worker / torchrun's | {fmt(x['worker_ratio'])} | ≤ 1.2 | "
                    f"{o['worker_max_mb']['median']:.0f} / {t['worker_max_mb']['median']:.0f} MiB |")  # fmt: skip
        rows.append(f"| B6 | peak RSS, all processes / torchrun's | {fmt(x['all_processes_ratio'])} | — | "
                    f"{o['all_processes_mb']['median']:.0f} / {t['all_processes_mb']['median']:.0f} MiB "
                    f"({o['processes']['median']:.0f} processes) |")  # fmt: skip
    return rows


def versions() -> dict[str, str]:
    import mlflow
    import ray
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "mlflow": mlflow.__version__,
        "cpus": str(os.cpu_count()),
        "machine": f"{platform.machine()}, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM",
        "gpu": "none (no GPU in this session: G1–G3 not measured)",
    }


def write(results: dict, out: Path, repeats: int) -> None:
    v = results["versions"]
    lines = [
        f"# Performance vs hand-written torchrun DDP ({repeats} alternated repeats asked; n per row)",
        "",
        f"Machine: {v['cpus']} CPUs, {v['machine']}, GPU: {v['gpu']}; python {v['python']}, "
        f"torch {v['torch']}, ray {v['ray']}, mlflow {v['mlflow']}; one thread per worker.",
        "",
        *table(results),
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "performance.json").write_text(json.dumps(results, indent=2))
    (out / "performance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="A/B pairs per figure")
    p.add_argument("--trials", default="16,64", help="B5 sweep sizes")
    p.add_argument(
        "--only",
        default="B1,B2,B3,B4,B5",
        help="which to run (B6 comes with B2); "
        "figures not run are kept from an earlier performance.json in --out",
    )
    p.add_argument("--tiny", action="store_true", help="smoke run; its figures mean nothing")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    # Stoppable with Ctrl-C or SIGTERM even when started in the background (where SIGINT is
    # ignored): both unwind through `finally`, which stops this script's Ray head.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.tiny:
        args.repeats, args.trials = min(args.repeats, 1), "2"
    only = set(args.only.split(","))
    out = Path(args.out)
    previous = out / "performance.json"
    results: dict[str, Any] = json.loads(previous.read_text()) if previous.exists() else {}
    results.update({"settings": vars(args), "versions": versions()})
    started = time.time()
    if only & {"B1", "B2", "B3", "B4"}:
        head, session = start_head()
        try:
            with tempfile.TemporaryDirectory(prefix="perf-") as tmp:
                cfg = Settings(args, Path(tmp), head)

                def publish(name: str, figures: dict) -> None:
                    done = figures.pop("repeats_done")
                    parts = figures if name == "B2" else {name: figures}  # B2 brings B6
                    results.update({k: {**v, "repeats_done": done} for k, v in parts.items()})
                    write(results, out, args.repeats)

                cfg.publish = publish
                for name, fn in (("B1", b1), ("B2", b2_b6), ("B3", b3), ("B4", b4)):
                    if name in only:
                        print(f"{name} ...", flush=True)
                        fn(cfg)
        finally:
            stop_head(session)
    if "B5" in only:
        print("B5 ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="perf-") as tmp:
            results["B5"] = b5(Settings(args, Path(tmp), None))
    results["seconds"] = time.time() - started
    write(results, out, args.repeats)


if __name__ == "__main__":
    main()
