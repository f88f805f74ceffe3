"""rnn_forecast: chronological split, baselines on that split, the cell switch, a short run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jobs import rnn_forecast as job
from orchestrator.cli import compose_config
from orchestrator.context import LocalContext
from orchestrator.job import job_config, load_job
from orchestrator.loop import run


def config(*overrides: str):
    cfg = compose_config(["job=rnn_forecast", *overrides])
    return cfg, job_config(load_job("rnn_forecast"), cfg["job"])


@pytest.fixture(scope="module")
def sunspots():
    return job.build_data(config()[1])


def test_short_run_gives_finite_rmse_consistent_with_per_sample_errors():
    cfg, _ = config("trainer.max_epochs=2", "trainer.batch_size=64")
    result = run(cfg, LocalContext())
    assert result.status == "finished"
    assert math.isfinite(result.metrics["train/loss_epoch"])
    # One process sees the whole held-out part: the hook's RMSE is the root of the mean
    # per-sample squared error that eval_step returned.
    assert result.metrics["val/rmse"] == pytest.approx(math.sqrt(result.metrics["val/se"]), 1e-4)
    # val/loss is in the training loss's (scaled) units.
    scale = job.build_data(job_config(load_job("rnn_forecast"), cfg["job"])).info["scale"]
    assert result.metrics["val/loss"] == pytest.approx(result.metrics["val/se"] / scale**2, 1e-4)


def test_split_is_chronological_last_20_percent(sunspots):
    series, n_train = sunspots.info["series"], sunspots.info["n_train"]
    assert len(series) == 309 and n_train == 247  # last 20 % = 62 years held out
    x_va, y_va = sunspots.val[:]
    x_tr, y_tr = sunspots.train[:]
    np.testing.assert_allclose(y_va.numpy(), series[n_train:], rtol=1e-6)  # in time order
    np.testing.assert_allclose(y_tr.numpy(), series[20:n_train], rtol=1e-6)
    # Held-out windows may read training values; each ends right before its target.
    np.testing.assert_allclose(x_va[0].numpy(), series[n_train - 20 : n_train], rtol=1e-6)
    np.testing.assert_allclose(x_va[1:, -1].numpy(), y_va[:-1].numpy())


def test_scaling_uses_training_part_only(sunspots):
    series, n_train = sunspots.info["series"], sunspots.info["n_train"]
    model = job.JOB.build_model(config()[1], sunspots)
    assert model.loc.item() == pytest.approx(series[:n_train].mean())
    assert model.scale.item() == pytest.approx(series[:n_train].std())
    assert model.loc.item() != pytest.approx(series.mean())


def test_baselines_use_the_same_split(sunspots):
    refs = job.references(config()[1], sunspots)
    x_va, y_va = sunspots.val[:]
    naive = torch.sqrt(((x_va[:, -1] - y_va) ** 2).mean()).item()
    assert refs["naive_rmse"] == pytest.approx(naive, rel=1e-5)
    assert refs["naive_rmse"] == pytest.approx(33.3, abs=0.1)  # the number
    assert 1 <= refs["ar_order"] <= 24
    assert refs["ar_rmse"] == pytest.approx(19.4, abs=0.5)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_each_cell_builds_and_trains_a_step(cell, sunspots):
    cfg, jcfg = config(f"job.cell={cell}")
    torch.manual_seed(0)
    model = job.JOB.build_model(jcfg, sunspots)
    assert type(model.rnn) is job.CELLS[cell]
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = sunspots.train[:32]
    loss = job.training_step(model, (x, y))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_co2_gaps_are_filled_and_unknown_cell_is_rejected():
    splits = job.build_data(config("job.dataset=co2", "job.window=52")[1])
    assert not np.isnan(splits.info["series"]).any()
    assert len(splits.val) == round(0.2 * len(splits.info["series"]))
    with pytest.raises(ValueError, match="job.cell"):
        job.Forecaster(config("job.cell=transformer")[1], 0.0, 1.0)
