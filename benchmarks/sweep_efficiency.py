"""ASHA vs. a full grid over the same space, on cnn_digits (issue: sweeps, "Efficiency").

    .venv/bin/python benchmarks/sweep_efficiency.py [--epochs 10] [--out benchmarks/results]

Runs two real sweeps with `orchestrate -m` on an embedded Ray in a temporary directory:
  grid: every point of a 16-point space, each trained to completion;
  asha: 16 trials sampled from the same space, ASHA early stopping.
Reports, from MLflow: best val/acc, total trial-epochs, wall time, and the orchestration
overhead per trial (trial run's wall time minus `time/loop_s`, the time inside the loop).
Writes sweep_efficiency.md and .json. Not part of the test run (a test runs it tiny).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPACE = ["optim.lr=1e-4,1e-3,3e-3,1e-2", "optim.weight_decay=0,1e-3", "trainer.batch_size=32,64"]
# --tiny: a 2-point space, 2 ASHA samples, 2 batches an epoch (the test that keeps this script
# from rotting); its figures mean nothing.
TINY_SPACE = ["optim.lr=1e-3,1e-2", "trainer.limit_batches=2"]


def run_sweep(workdir: Path, extra: list[str], epochs: int, samples: int, space: list[str]) -> dict:
    orchestrate = str(Path(sys.executable).parent / "orchestrate")
    args = [
        orchestrate,
        "-m",
        "job=cnn_digits",
        "trainer.num_workers=1",
        f"trainer.max_epochs={epochs}",
        *space,
        f"sweep.num_samples={samples}",
        "tracking.log_model=false",
        *extra,
    ]
    t0 = time.monotonic()
    out = subprocess.run(args, cwd=workdir, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if out.returncode != 0:
        raise SystemExit(f"sweep failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("orchestrator")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    overheads = [
        (r.info.end_time - r.info.start_time) / 1000 - r.data.metrics["time/loop_s"]
        for r in children
        if "time/loop_s" in r.data.metrics and r.info.end_time
    ]
    return {
        "trials": len(children),
        "best_val_acc": max(r.data.metrics.get("val/acc", 0.0) for r in children),
        "trial_epochs": int(sum(r.data.metrics.get("epoch", 0) for r in children)),
        "wall_s": round(wall, 1),
        "overhead_per_trial_s": round(statistics.median(overheads), 2) if overheads else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--sweeps", default="grid,asha", help="which to run; the others are read from --out"
    )
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    args = parser.parse_args()
    out = Path(args.out)
    previous = out / "sweep_efficiency.json"
    results = json.loads(previous.read_text()) if previous.exists() else {}
    settings = {
        "grid": (["sweep.search=grid"], 1),
        "asha": (["sweep.scheduler=asha", "sweep.reduction_factor=2"], 2 if args.tiny else 16),
    }
    space = TINY_SPACE if args.tiny else SPACE
    for name in args.sweeps.split(","):
        with tempfile.TemporaryDirectory() as workdir:
            results[name] = run_sweep(
                Path(workdir), settings[name][0], args.epochs, settings[name][1], space
            )
    g, a = results["grid"], results["asha"]
    results["asha_minus_grid_points"] = round(100 * (a["best_val_acc"] - g["best_val_acc"]), 2)
    results["asha_epoch_share"] = round(a["trial_epochs"] / g["trial_epochs"], 3)
    lines = [
        f"# Sweep efficiency: cnn_digits, {args.epochs} epochs, 1 worker per trial",
        "",
        "| sweep | trials | best val/acc | trial-epochs | wall s | overhead per trial s |",
        "|---|---|---|---|---|---|",
        *(
            f"| {k} | {v['trials']} | {v['best_val_acc']:.4f} | {v['trial_epochs']} | {v['wall_s']} | "
            f"{v['overhead_per_trial_s']} |"
            for k, v in (("grid", g), ("asha", a))
        ),
        "",
        f"ASHA − grid best accuracy: {results['asha_minus_grid_points']:+.2f} points; "
        f"ASHA used {100 * results['asha_epoch_share']:.0f} % of the grid's trial-epochs.",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_efficiency.md").write_text("\n".join(lines) + "\n")
    (out / "sweep_efficiency.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
