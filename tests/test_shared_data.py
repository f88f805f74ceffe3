"""A run's data and reference scores, built once beside the driver (orchestrator/shared_data.py):
on the session's real Ray head, read back through Ray's State API."""

from __future__ import annotations

import time

import psutil
import pytest

from orchestrator import shared_data
from orchestrator.cli import compose_config
from tests.conftest import HEAD_DASHBOARD, head_tasks, wait_for

BUILD, REFERENCES = "_DataBuilder.build_data", "_DataBuilder.references"


def _builder(actor_id: str):
    from ray.util.state import get_actor

    return get_actor(actor_id, address=HEAD_DASHBOARD[0])


def _finished_call(name: str, before: set[str]):
    """The one call `name` started since `before` (task ids), once the State API lists it done."""
    wait_for(
        lambda: any(t.state == "FINISHED" for t in head_tasks(name) if t.task_id not in before),
        30,
        f"the head to list {name} as finished",
    )
    (call,) = [t for t in head_tasks(name) if t.task_id not in before and t.state == "FINISHED"]
    return call


def test_splits_and_references_come_from_one_process_that_then_ends(ray_driver):
    before = {t.task_id for t in head_tasks(BUILD) + head_tasks(REFERENCES)}
    cfg = compose_config(["job=cnn_digits"])
    refs = shared_data.start(cfg)
    splits = shared_data.fetch(refs, "splits")
    assert (len(splits.train), len(splits.val)) == (1437, 360)  # load_digits, 20 % held out
    assert shared_data.fetch(refs, "references")["svm_rbf_acc"] > 0.95
    built, scored = _finished_call(BUILD, before), _finished_call(REFERENCES, before)
    # The references reused the process (and its imports) that built the data...
    assert built.actor_id == scored.actor_id and built.worker_id == scored.worker_id
    # ... which ended once both were done (their results stay, owned by this driver).
    wait_for(lambda: _builder(built.actor_id).state == "DEAD", 30, "the builder to end")
    assert shared_data.fetch(refs, "references")["svm_rbf_acc"] > 0.95


@pytest.mark.fault
def test_a_builder_killed_while_building_is_replaced_and_both_results_arrive(ray_driver):
    before = {t.task_id for t in head_tasks(BUILD)}
    refs = shared_data.start(compose_config(["job=cnn_digits"]))
    deadline, killed = time.monotonic() + 60, None
    while killed is None and time.monotonic() < deadline:  # kill it mid-build
        for p in psutil.process_iter(["cmdline"]):
            if BUILD in " ".join(p.info["cmdline"] or []):
                p.kill()
                killed = p.pid
                break
        time.sleep(0.02)
    assert killed is not None, "no process was building the data"
    assert len(shared_data.fetch(refs, "splits").train) == 1437
    assert shared_data.fetch(refs, "references")["svm_rbf_acc"] > 0.95
    # Not vacuous: the kill hit the build (one row per attempt), which ran again elsewhere.
    retried = _finished_call(BUILD, before)
    assert retried.attempt_number >= 1, retried


def _fails():
    raise RuntimeError("this run's data is gone")


def _checkpoint_of_fresh_model(job, cfg, splits, folder) -> str:
    from orchestrator import checkpoint
    from orchestrator.job import job_config

    model = job.build_model(job_config(job, cfg["job"]), splits)
    checkpoint.save({"model": model.state_dict(), "epoch": 1}, folder)
    return str(folder)


def test_the_final_model_is_logged_from_the_runs_splits_not_data_built_again(
    ray_driver, tmp_path, capsys
):
    """The driver rebuilds the trained model from the builder's splits (no scikit-learn import
    and no second build_data after training); when those are gone it builds them itself."""
    import dataclasses

    from mlflow import MlflowClient

    from orchestrator import tracking
    from orchestrator.job import load_job
    from orchestrator.runner import log_final_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose_config(["job=cnn_digits", f"tracking.uri={uri}"])
    refs = shared_data.start(cfg)
    job = load_job("cnn_digits")
    ckpt = _checkpoint_of_fresh_model(job, cfg, shared_data.fetch(refs, "splits"), tmp_path / "c")
    builds = []

    def counted_build(jcfg):
        builds.append(jcfg)
        return job.build_data(jcfg)

    driver_job = dataclasses.replace(job, build_data=counted_build)
    kept, lost = (tracking.create_run(uri, "final", n, {}, {}, "") for n in ("kept", "lost"))

    log_final_model(cfg, driver_job, kept, ckpt, refs)
    assert builds == []  # the kept splits were used
    # The splits' object gone (here: never built): the driver builds the data itself.
    log_final_model(cfg, driver_job, lost, ckpt, {"splits": ray_driver.remote(_fails).remote()})
    assert len(builds) == 1

    client = MlflowClient(uri)
    for run_id in (kept, lost):
        assert client.get_run(run_id).info.status == "FINISHED"
    logged = capsys.readouterr().out
    assert logged.count("Model logged: models:/") == 2, logged


def test_a_damaged_final_checkpoint_gives_way_to_the_newest_intact_one(tmp_path, capsys):
    """Ray hands the driver its latest registered checkpoint, which a crash mid-copy may have
    truncated (seen: SIGTERM as the last epoch's checkpoint was written, then a resume with
    nothing left to train). The final model then comes from the newest intact one beside it."""
    from mlflow import MlflowClient

    from orchestrator import tracking
    from orchestrator.checkpoint import RAY_RUN_SNAPSHOT
    from orchestrator.job import job_config, load_job
    from orchestrator.runner import log_final_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose_config(["job=cnn_digits", f"tracking.uri={uri}"])
    job = load_job("cnn_digits")
    splits = job.build_data(job_config(job, cfg["job"]))
    run_dir = tmp_path / "cnn_digits-run"
    _checkpoint_of_fresh_model(job, cfg, splits, run_dir / "checkpoint_older")
    latest = _checkpoint_of_fresh_model(job, cfg, splits, run_dir / "checkpoint_latest")
    (run_dir / RAY_RUN_SNAPSHOT).write_text("{}")  # what makes run_dir a Ray run's directory
    state = run_dir / "checkpoint_latest" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    run_id = tracking.create_run(uri, "final", "damaged", {}, {}, "")

    log_final_model(cfg, job, run_id, latest)  # no shared splits: the driver builds them

    out = capsys.readouterr().out
    assert "final model from checkpoint_older (skipped " in out, out
    assert "checksum mismatch" in out and "Model logged: models:/" in out, out
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
