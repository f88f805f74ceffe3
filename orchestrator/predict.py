"""`orchestrate-predict`: batch inference with a logged or registered model.

    orchestrate-predict models:/digits_cnn@champion --split val      # the training run's held-out split
    orchestrate-predict models:/digits_cnn@champion images.csv       # writes images.predictions.csv
    orchestrate-predict runs:/<run id>/model rows.npy --workers 2    # in parallel on Ray (2 tasks)

The model is looked up in the tracking store (`--tracking-uri`, default the same
`sqlite:///mlflow.db` in the current directory that `orchestrate` writes). Input rows are
checked against the model's logged signature before anything runs; a flat row (CSV/Parquet
columns, or a 2-D array) is reshaped to the signature's shape when the sizes agree. With labels
(`--split`, or `--label-column` in a table) the accuracy is reported. Every call is recorded as
an MLflow run in the `--experiment` experiment: model URI and version, input, rows, rows/s.

Safety: a model saved as a pickle runs code when loaded. Only `torch.export` programs
(model.pt2, what `orchestrate` logs) load without `--allow-pickle`; arrays load with
allow_pickle=False.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.errors import UserError

TABLE_SUFFIXES = (".csv", ".parquet")


@dataclass
class ModelRef:
    uri: str
    local_dir: Path  # downloaded copy: MLmodel + data/
    version: str | None  # registry version, when the URI names one
    source_run: str | None  # the training run that logged the model
    input_shape: list[int]  # signature's input tensor shape, -1 for the batch
    input_dtype: str


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="orchestrate-predict",
        description="Score a file or a job's data split with a logged or registered model.",
    )
    p.add_argument(
        "model", help="models:/<name>@<alias>, models:/<name>/<version> or runs:/<id>/model"
    )
    p.add_argument("input", nargs="?", help=".csv, .parquet or .npy file of input rows")
    p.add_argument("--split", choices=["train", "val"], help="score the training run's data split")
    p.add_argument("--label-column", help="table column holding true class ids (not an input)")
    p.add_argument("--output", help="where to write predictions (default: beside the input)")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default="orchestrator-predict")
    p.add_argument("--workers", type=int, default=1, help="Ray tasks to split the rows over")
    p.add_argument("--cluster-address", default=None, help="Ray cluster (default: embedded)")
    p.add_argument("--allow-pickle", action="store_true", help="trust a pickled model")
    args = p.parse_args(argv)
    if (args.input is None) == (args.split is None):
        raise UserError("input", "give exactly one of an input file or --split", "see --help")
    if args.workers < 1:
        raise UserError("--workers", f"must be at least 1, got {args.workers}", "use --workers 1")
    return args


def resolve_model(uri: str, tracking_uri: str, allow_pickle: bool, into: Path) -> ModelRef:
    """Find the model (clear errors for a missing name, alias or run), download it, and refuse
    a pickled one unless allowed."""
    import json

    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    version = None
    name_ref = uri.removeprefix("models:/")
    if uri.startswith("models:/") and not name_ref.startswith("m-"):  # m-<id>: a logged model
        name, _, alias = name_ref.partition("@")
        name, _, number = name.partition("/")
        try:
            if alias:
                version = client.get_model_version_by_alias(name, alias).version
            else:
                version = client.get_model_version(name, number).version
        except MlflowException as exc:
            known = [m.name for m in client.search_registered_models()]
            raise UserError(
                "model",
                f"'{uri}' not found ({str(exc).splitlines()[0][:120]})",
                f"registered models: {', '.join(known) or 'none'}; check the name and alias",
            ) from None
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(uri, dst_path=str(into), tracking_uri=tracking_uri)
        )
    except (MlflowException, OSError) as exc:
        raise UserError(
            "model", f"cannot load '{uri}' ({str(exc).splitlines()[0][:160]})", "check the URI"
        ) from None
    meta = yaml.safe_load((local / "MLmodel").read_text())
    if not (local / "data" / "model.pt2").is_file() and not allow_pickle:
        raise UserError(
            "model",
            f"'{uri}' is stored as a pickle, and loading a pickle runs code from it",
            "pass --allow-pickle if you trust where it came from",
        )
    (spec,) = json.loads(meta["signature"]["inputs"])
    tensor = spec["tensor-spec"]
    return ModelRef(uri, local, version, meta.get("run_id"), tensor["shape"], tensor["dtype"])


def read_input(args: argparse.Namespace, model: ModelRef, tracking_uri: str):
    """(rows as an array, labels or None, where to write predictions)."""
    if args.split:
        return _split_rows(args.split, model, tracking_uri)
    path = Path(args.input).resolve()
    if not path.is_file():
        raise UserError("input", f"no such file '{path}'", "check the path")
    labels = None
    if path.suffix == ".npy":
        try:
            rows = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise UserError(
                "input", f"'{path}' is not a plain numeric array ({exc})", "save it with numpy.save"
            ) from None
    elif path.suffix in TABLE_SUFFIXES:
        import pandas as pd

        table = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
        if args.label_column:
            if args.label_column not in table:
                raise UserError(
                    "--label-column",
                    f"'{args.label_column}' is not a column of '{path.name}'",
                    f"columns: {', '.join(map(str, table.columns[:10]))}",
                )
            labels = table.pop(args.label_column).to_numpy()
        rows = table.to_numpy()
    else:
        raise UserError(
            "input", f"'{path.name}': unsupported file type", "use .csv, .parquet or .npy"
        )
    out = (
        Path(args.output)
        if args.output
        else path.with_name(f"{path.stem}.predictions{'.npy' if path.suffix == '.npy' else '.csv'}")
    )
    return conform(rows, model, path.name), labels, out


def conform(rows: np.ndarray, model: ModelRef, what: str) -> np.ndarray:
    """Rows in the signature's shape and dtype, or a UserError naming both shapes."""
    want = list(model.input_shape[1:])
    per_row = int(np.prod(want)) if want else 1
    if rows.ndim < 1 or len(rows) == 0 or int(np.prod(rows.shape[1:])) != per_row:
        raise UserError(
            "input",
            f"'{what}' has rows of shape {list(rows.shape[1:])}; the model takes {want} ({per_row} values a row)",
            "give the model's input columns only (see its signature in the MLflow UI)",
        )
    try:
        return rows.reshape(len(rows), *want).astype(model.input_dtype)
    except (TypeError, ValueError) as exc:
        raise UserError(
            "input", f"'{what}' is not numeric ({exc})", "remove text columns"
        ) from None


def _split_rows(split: str, model: ModelRef, tracking_uri: str):
    """The training run's own data split, rebuilt from the config it logged."""
    import mlflow
    import yaml

    from orchestrator.job import job_config, load_job

    if model.source_run is None:
        raise UserError("--split", f"'{model.uri}' has no training run", "give an input file")
    path = mlflow.artifacts.download_artifacts(
        run_id=model.source_run, artifact_path="config.yaml", tracking_uri=tracking_uri
    )
    cfg = yaml.safe_load(Path(path).read_text())
    job = load_job(cfg["job"]["name"])
    splits = job.build_data(job_config(job, cfg["job"]))
    data = splits.val if split == "val" else splits.train
    x, y = data[:]  # type: ignore[index]
    return (
        conform(x.numpy(), model, f"{split} split"),
        y.numpy(),
        Path(f"predictions_{model.source_run[:8]}_{split}.csv").resolve(),
    )


def predict_rows(model_dir: str, rows: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    import mlflow

    model = mlflow.pyfunc.load_model(model_dir)
    return np.concatenate(
        [
            np.asarray(model.predict(rows[i : i + batch_size]))
            for i in range(0, len(rows), batch_size)
        ]
    )


def write_predictions(outputs: np.ndarray, path: Path) -> None:
    """Atomically: a half-written predictions file never appears under the final name."""
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, outputs)
    else:
        import pandas as pd

        flat = outputs.reshape(len(outputs), -1)
        table = pd.DataFrame(flat, columns=[f"output_{i}" for i in range(flat.shape[1])])
        if outputs.ndim == 2 and outputs.shape[1] > 1:
            table.insert(0, "prediction", outputs.argmax(1))
        table.to_csv(tmp, index=False)
    os.replace(tmp, path)


def run(argv: list[str]) -> int:
    from orchestrator import launch, preflight, tracking

    args = parse_args(argv)
    uri = preflight.resolve_tracking_uri(args.tracking_uri, os.getcwd())
    preflight.check_tracking(uri)
    with tempfile.TemporaryDirectory(prefix="orchestrate-predict-") as tmp:
        model = resolve_model(args.model, uri, args.allow_pickle, Path(tmp))
        rows, labels, out = read_input(args, model, uri)
        if args.workers > 1:
            preflight.check_cluster(args.cluster_address)
        # Everything is checked: only now is the inference run created.
        run_id = tracking.create_run(
            uri,
            args.experiment,
            f"predict-{Path(args.input or args.split).name}",
            {
                "model_uri": args.model,
                "model_version": str(model.version),
                "input": str(args.input or f"split:{args.split}"),
                "workers": str(args.workers),
            },
            {
                "orchestrator.command": "orchestrate-predict " + " ".join(map(shlex.quote, argv)),
                "source_run": str(model.source_run),
            },
            "",
        )
        status = "FAILED"
        try:
            if args.workers > 1:
                launch.connect(
                    {"address": args.cluster_address, "num_cpus": 0, "show_worker_logs": False}
                )
                shards = np.array_split(rows, args.workers)
                started = time.perf_counter()  # scoring only: not the cluster's start
                outputs = np.concatenate(launch.run_tasks(predict_rows, shards, model.local_dir))
            else:
                started = time.perf_counter()
                outputs = predict_rows(str(model.local_dir), rows)
            seconds = time.perf_counter() - started
            write_predictions(outputs, out)
            metrics = {
                "rows": float(len(rows)),
                "seconds": seconds,
                "rows_per_s": len(rows) / seconds,
            }
            if labels is not None and outputs.ndim == 2:
                metrics["accuracy"] = float((outputs.argmax(1) == labels).mean())
            tracking.log_metrics_now(uri, run_id, metrics, step=0)
            status = "FINISHED"
        finally:
            tracking.end_run(uri, run_id, status)
            if args.workers > 1:
                launch.shutdown()
    print(
        f"Scored {len(rows)} rows with {args.model} (version {model.version}) in {seconds:.2f}s ({metrics['rows_per_s']:.0f} rows/s)"
    )
    if "accuracy" in metrics:
        print(f"  accuracy {metrics['accuracy']:.4f}")
    print(f"Predictions: {out}\nMLflow run id: {run_id} (experiment '{args.experiment}')")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return run(list(sys.argv[1:] if argv is None else argv))
    except UserError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
