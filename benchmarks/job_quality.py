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
    "transformer_lm": (
        "val/bpc",
        "baseline/ngram_bpc",
        "< best n-gram (n ≤ 5)",
        lambda m: m["val/bpc"] < m["baseline/ngram_bpc"],
    ),
    "autoencoder_digits": (
        "val/mse",
        "baseline/pca8_mse",
        "≤ 0.8 × PCA-8",
        lambda m: m["val/mse"] <= 0.8 * m["baseline/pca8_mse"],
    ),
    "gan_digits": (
        "val/fid_ratio",
        "baseline/fid_floor",
        "FID ≤ 6 × floor, every class ≥ 4 %",
        lambda m: m["val/fid_ratio"] <= 6 and m["val/min_class_share"] >= 0.04,
    ),
    "diffusion_digits": (
        "val/fid_ratio",
        "baseline/fid_floor",
        "FID ≤ 3 × floor, every class ≥ 4 %, FID < gan_digits'",
        lambda m: m["val/fid_ratio"] <= 3 and m["val/min_class_share"] >= 0.04,
    ),
    "gnn_graphs": (
        "val/acc",
        "baseline/degree_hist_logreg_acc",
        "≥ 0.95 and > baseline",
        lambda m: m["val/acc"] >= 0.95 and m["val/acc"] > m["baseline/degree_hist_logreg_acc"],
    ),
    "ssm_selective_copy": (
        "val/acc",
        "baseline/lstm_acc",
        "≥ 0.97 (LSTM of equal size beside it)",
        lambda m: m["val/acc"] >= 0.97,
    ),
    "finetune_digits": (
        "val/acc",
        "baseline/scratch_acc",
        "≥ scratch + 0.05",
        lambda m: m["val/acc"] >= m["baseline/scratch_acc"] + 0.05,
    ),
}

# Jobs that start from another job's registered model: what runs first, in the same store.
PRETRAIN = {
    "finetune_digits": (
        ["job=autoencoder_digits", "tracking.register_as=digits_ae"],
        ["job.init_from=models:/digits_ae@champion"],
    )
}


def orchestrate(args: list[str], workdir: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "orchestrate"), *args]
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True)


def run_job(job: str, out_dir: str, overrides: list[str]) -> dict:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.monotonic()
        pretrain, extra = PRETRAIN.get(job, ([], []))
        out = orchestrate([*pretrain, *overrides], workdir) if pretrain else None
        if out is None or out.returncode == 0:
            t0 = time.monotonic()  # the job's own wall time, without its pretraining
            out = orchestrate([f"job={job}", *extra, *overrides], workdir)
        wall = time.monotonic() - t0
        if out.returncode != 0:
            log = Path(out_dir) / "logs" / f"{job}.log"  # the whole output, to see why
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)
            lines = (out.stderr or out.stdout).strip().splitlines()
            reason = next((x for x in lines if x.startswith("error:")), lines[-1] if lines else "")
            return {"job": job, "error": f"{reason} (full output: {log})", "wall_s": round(wall)}
        client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
        experiment = client.get_experiment_by_name("orchestrator").experiment_id
        (run,) = client.search_runs([experiment], f"tags.job = '{job}'")
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
        "metrics": {k: v for k, v in metrics.items() if k.startswith(("val/", "baseline/"))},
    }


def compare_generators(rows: list[dict]) -> None:
    """diffusion_digits' bar includes beating gan_digits (when both ran)."""
    by_job = {r["job"]: r for r in rows if "error" not in r}
    if "gan_digits" in by_job and "diffusion_digits" in by_job:
        gan, diffusion = by_job["gan_digits"], by_job["diffusion_digits"]
        diffusion["met"] = diffusion["met"] and diffusion["value"] < gan["value"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", default=",".join(BARS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="added to every job's command, e.g. trainer.max_epochs=1 (smoke runs only)",
    )
    args = parser.parse_args()
    rows = []
    for job in args.jobs.split(","):
        rows.append(run_job(job, args.out, args.override))
        print({k: v for k, v in rows[-1].items() if k != "metrics"}, flush=True)
    compare_generators(rows)
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
