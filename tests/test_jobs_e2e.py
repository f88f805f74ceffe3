"""Every job in the catalogue trains a few steps on 2 gloo DDP workers and logs what a
reviewer needs: its main metric, its reference baseline(s), its plots and its model."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.job import load_job
from tests.conftest import run_cli, runs_of, tracking_uri

JOBS = sorted(p.stem for p in (Path(__file__).parent.parent / "conf" / "job").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("job", JOBS)
def test_job_trains_on_two_workers_and_logs_metrics_and_artifacts(job, tmp_path, ray_head):
    out = run_cli(
        [
            f"job={job}",
            "trainer.num_workers=2",
            "trainer.max_epochs=1",
            "trainer.limit_batches=3",
            f"cluster.address={ray_head}",
        ],
        tmp_path,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (run,) = runs_of(tmp_path)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert load_job(job).main_metric in metrics
    assert any(k.startswith("baseline/") for k in metrics), f"{job} logs no reference baseline"
    client = MlflowClient(tracking_uri(tmp_path))
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    plots = logged - {"config.yaml", "model"}
    assert plots, f"{job} logged no plot or text artifact: {logged}"
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run.info.run_id]
