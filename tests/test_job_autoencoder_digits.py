"""autoencoder_digits in one process: trains, PCA reference on the same split, anomaly mode."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.cli import compose_config
from orchestrator.context import LocalContext
from orchestrator.job import EpochEnd, job_config, load_job
from orchestrator.loop import run
from orchestrator.tracking import NullMetricLogger

JOB = load_job("autoencoder_digits")


def setup(*overrides: str):
    cfg = compose_config(["job=autoencoder_digits", *overrides])
    jcfg = job_config(JOB, cfg["job"])
    return cfg, jcfg, JOB.build_data(jcfg)


def hook(model, splits, jcfg, epoch: int, max_epochs: int):
    sink = NullMetricLogger()
    end = EpochEnd(model.eval(), splits, jcfg, epoch, max_epochs, torch.device("cpu"), sink)
    with torch.no_grad():
        return JOB.evaluate(end), sink.artifacts  # type: ignore[misc]


def test_trains_and_beats_pca_with_few_epochs():
    cfg = compose_config(["job=autoencoder_digits", "trainer.max_epochs=6"])
    result = run(cfg, LocalContext())
    assert result.status == "finished" and math.isfinite(result.metrics["train/loss_epoch"])
    # Six epochs already beat PCA with 4 components (held-out MSE 0.038); PCA-8 has 0.0246.
    assert 0 < result.metrics["val/mse"] < 0.038


def test_pca_reference_on_the_fixed_split_matches_the_issue():
    _, jcfg, splits = setup()
    assert (len(splits.train), len(splits.val)) == (1437, 360)
    x = splits.train[:][0]
    assert x.shape[1:] == (1, 8, 8) and x.min() == 0 and x.max() == 1
    assert JOB.references(jcfg, splits) == {"pca8_mse": pytest.approx(0.0246, abs=1e-4)}  # type: ignore[misc]


def test_encoder_is_a_named_submodule_with_latent_dim_outputs():
    _, jcfg, splits = setup("job.latent_dim=5")
    model = JOB.build_model(jcfg, splits).eval()
    x = splits.val[:4][0]
    assert model.encoder(x).shape == (4, 5)
    assert model(x).shape == x.shape and 0 <= model(x).min() and model(x).max() <= 1


def test_input_corruption_only_in_training_and_off_when_zero():
    _, jcfg, splits = setup()
    x = splits.val[:4][0]
    model = JOB.build_model(jcfg, splits)
    assert not torch.allclose(model.train()(x), model.eval()(x), atol=1e-3)
    off = ["job.noise_std=0", "job.max_shift_px=0", "job.max_rotate_deg=0", "job.max_scale=0"]
    _, jcfg, _ = setup(*off)
    model = JOB.build_model(jcfg, splits)  # no dropout by default: corruption is all there is
    assert torch.allclose(model.train()(x), model.eval()(x), atol=1e-6)


def test_reconstruction_grid_only_at_the_last_or_every_nth_epoch():
    _, jcfg, splits = setup("job.image_every=5")
    model = JOB.build_model(jcfg, splits)
    assert hook(model, splits, jcfg, 3, 12) == ({}, [])
    assert hook(model, splits, jcfg, 5, 12)[1] == ["reconstructions/epoch_005.png"]
    assert hook(model, splits, jcfg, 12, 12)[1] == ["reconstructions/epoch_012.png"]


def test_anomaly_mode_trains_without_the_class_and_reports_auroc():
    _, jcfg, splits = setup("job.anomaly_class=9")
    _, y_train = splits.train[:]
    assert 9 not in y_train.tolist() and len(splits.train) == 1437 - 144
    assert len(splits.val) == 360  # the full held-out split, anomalies included
    refs = JOB.references(jcfg, splits)  # type: ignore[misc]
    assert 0.5 < refs["pca8_auroc"] < 1 and refs["pca8_mse"] > 0
    metrics, _ = hook(JOB.build_model(jcfg, splits), splits, jcfg, 1, 10)
    assert 0 <= metrics["val/auroc"] <= 1
