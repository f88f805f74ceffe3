"""`orchestrate-predict` against a real registered model, a real MLflow store and real Ray tasks."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, run_cli, runs_of, tracking_uri

PREDICT = str(BIN / "orchestrate-predict")
pytestmark = pytest.mark.slow


def predict(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([PREDICT, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def store(tmp_path_factory, ray_head):
    """A cnn_digits run registered as digits_cnn@champion, plus the digits as CSV and .npy."""
    from sklearn.datasets import load_digits

    where = tmp_path_factory.mktemp("predict")
    # A registry URI in the shell must not divert the model away from its run's store.
    decoy = f"sqlite:///{where / 'decoy.db'}"
    out = run_cli(
        [
            "job=cnn_digits",
            "trainer.max_epochs=2",
            "trainer.num_workers=1",
            "tracking.register_as=digits_cnn",
            f"cluster.address={ray_head}",
        ],
        where,
        env={**os.environ, "MLFLOW_REGISTRY_URI": decoy},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert MlflowClient(decoy, registry_uri=decoy).search_registered_models() == []
    digits = load_digits()
    table = pd.DataFrame(digits.data / 16.0, columns=[f"p{i}" for i in range(64)])
    table["label"] = digits.target
    table.to_csv(where / "digits.csv", index=False)
    np.save(where / "digits.npy", (digits.images / 16.0).astype("float32"))
    return where


def inference_runs(where):
    return runs_of(where, "orchestrator-predict")


def test_champion_reproduces_the_training_runs_held_out_accuracy(store):
    (trained,) = runs_of(store)
    before = len(inference_runs(store))
    out = predict(["models:/digits_cnn@champion", "--split", "val"], store)
    assert out.returncode == 0, out.stderr
    runs = inference_runs(store)
    assert len(runs) == before + 1
    run = runs[0]  # newest first
    assert run.info.status == "FINISHED"
    assert run.data.params["model_version"] == "1"
    assert run.data.tags["source_run"] == trained.info.run_id
    assert run.data.metrics["rows"] == 360
    assert run.data.metrics["accuracy"] == pytest.approx(trained.data.metrics["val/acc"], abs=1e-9)
    written = pd.read_csv(store / f"predictions_{trained.info.run_id[:8]}_val.csv")
    assert len(written) == 360 and "prediction" in written


def test_csv_with_labels_writes_predictions_beside_it(store):
    out = predict(["models:/digits_cnn@champion", "digits.csv", "--label-column", "label"], store)
    assert out.returncode == 0, out.stderr
    written = pd.read_csv(store / "digits.predictions.csv")
    labels = pd.read_csv(store / "digits.csv")["label"]
    assert list(written.columns) == ["prediction", *[f"output_{i}" for i in range(10)]]
    accuracy = (written["prediction"] == labels).mean()
    assert accuracy > 0.9
    assert inference_runs(store)[0].data.metrics["accuracy"] == pytest.approx(accuracy)


def test_ray_tasks_give_the_same_outputs_as_one_process(store, ray_head):
    args = ["models:/digits_cnn/1", "digits.npy"]
    assert predict(args, store).returncode == 0
    local = np.load(store / "digits.predictions.npy")
    out = predict([*args, "--workers", "2", "--cluster-address", ray_head], store)
    assert out.returncode == 0, out.stderr
    parallel = np.load(store / "digits.predictions.npy")
    assert parallel.shape == (1797, 10)
    np.testing.assert_allclose(parallel, local, rtol=1e-5, atol=1e-5)
    assert inference_runs(store)[0].data.params["workers"] == "2"


def _pickled_copy(store) -> str:
    """The champion re-logged with its program swapped for a (would-be) pickle file."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(store))
    mlflow.set_registry_uri(tracking_uri(store))
    local = mlflow.artifacts.download_artifacts("models:/digits_cnn@champion")
    shutil.move(f"{local}/data/model.pt2", f"{local}/data/model.pth")
    with mlflow.start_run(experiment_id="0") as run:
        mlflow.log_artifacts(local, "model")
    return f"runs:/{run.info.run_id}/model"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "args, message",
    [
        (["models:/digits_cnn@nope", "digits.csv"], "'models:/digits_cnn@nope' not found"),
        (["models:/no_such_model@champion", "digits.csv"], "registered models: digits_cnn"),
        (["models:/digits_cnn@champion", "digits.csv"], "rows of shape [65]"),  # label column kept
        (["models:/digits_cnn@champion", "missing.csv"], "no such file"),
        (["models:/digits_cnn@champion", "digits.txt"], "unsupported file type"),
        (
            ["models:/digits_cnn@champion", "digits.csv", "--label-column", "y"],
            "'y' is not a column",
        ),
        (["models:/digits_cnn@champion"], "exactly one of an input file or --split"),
        (["models:/digits_cnn@champion", "digits.npy", "--workers", "0"], "--workers"),
        (["PICKLED", "digits.npy"], "--allow-pickle"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_inference_run(store, args, message):
    (store / "digits.txt").write_text("1,2,3\n")
    if args[0] == "PICKLED":
        args = [_pickled_copy(store), *args[1:]]
    before = len(inference_runs(store))
    out = predict(args, store)
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert len(inference_runs(store)) == before
