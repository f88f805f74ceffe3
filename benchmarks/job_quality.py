"""Train every job with its default config and check it against its bar (issue: job catalogue).

    .venv/bin/python benchmarks/job_quality.py [--jobs cnn_digits,gnn_graphs] [--out benchmarks/results]

Each job runs as a user would run it (`orchestrate job=<name>`, 2 DDP workers, embedded Ray)
in a fresh directory; the main metric and the reference baselines are read back from MLflow.
Writes job_quality.md and .json: job, metric, baseline, bar, met?, wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# job -> (main metric, the reference shown, bar as text, check(metrics) -> bool)
BARS = {
    "cnn_digits": ("val/acc", "baseline/svm_rbf_acc", "≥ 0.985", lambda m: m["val/acc"] >= 0.985),
    "mlp_tabular": ("val/acc", "baseline/logreg_acc", "≥ 0.97", lambda m: m["val/acc"] >= 0.97),
    "rnn_forecast": (
        "val/rmse",
        "baseline/ar_rmse",
        "≤ tuned AR(p)",
        lambda m: m["val/rmse"] <= m["baseline/ar_rmse"],
    ),
    "autoencoder_digits": (
        "val/mse",
        "baseline/pca8_mse",
        "≤ 0.8 × PCA-8",
        lambda m: m["val/mse"] <= 0.8 * m["baseline/pca8_mse"],
    ),
    "gnn_graphs": (
        "val/acc",
        "baseline/degree_hist_logreg_acc",
        "≥ 0.95 and > baseline",
        lambda m: m["val/acc"] >= 0.95 and m["val/acc"] > m["baseline/degree_hist_logreg_acc"],
    ),
}


def run_job(job: str) -> dict:
    from mlflow.tracking import MlflowClient

    orchestrate = str(Path(sys.executable).parent / "orchestrate")
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.monotonic()
        out = subprocess.run(
            [orchestrate, f"job={job}"], cwd=workdir, capture_output=True, text=True
        )
        wall = time.monotonic() - t0
        if out.returncode != 0:
            return {
                "job": job,
                "error": (out.stderr or out.stdout).strip().splitlines()[-1],
                "wall_s": round(wall),
            }
        client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
        (run,) = client.search_runs([client.get_experiment_by_name("orchestrator").experiment_id])
        metrics = run.data.metrics
    metric, reference, bar, check = BARS[job]
    return {
        "job": job,
        "metric": metric,
        "value": metrics[metric],
        "reference": reference,
        "reference_value": metrics.get(reference),
        "bar": bar,
        "met": bool(check(metrics)),
        "wall_s": round(wall),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", default=",".join(BARS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    rows = []
    for job in args.jobs.split(","):
        rows.append(run_job(job))
        print(rows[-1], flush=True)
    lines = [
        "| job | metric | value | reference | reference value | bar | met? | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['job']} | failed: {r['error']} | | | | | no | {r['wall_s']} |")
        else:
            ref = f"{r['reference_value']:.4f}" if r["reference_value"] is not None else "-"
            lines.append(
                f"| {r['job']} | {r['metric']} | {r['value']:.4f} | {r['reference'].removeprefix('baseline/')} "
                f"| {ref} | {r['bar']} | {'yes' if r['met'] else 'no'} | {r['wall_s']} |"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "job_quality.md").write_text("\n".join(lines) + "\n")
    (out / "job_quality.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
