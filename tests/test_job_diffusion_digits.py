"""diffusion_digits: composes, trains a few steps, and its schedule, loss, sampler and export."""

from __future__ import annotations

import math

import pytest
import torch

from jobs import cnn_digits
from jobs.diffusion_digits import JOB, DiffusionDigitsConfig, alpha_bars, eval_step, export
from orchestrator.cli import compose_config
from orchestrator.context import LocalContext
from orchestrator.loop import run

TINY = ["job.hidden=32", "job.depth=1", "job.timesteps=20", "job.sample_steps=4"]


def test_composes_and_trains_a_few_steps_to_the_main_metric():
    cfg = compose_config(["job=diffusion_digits"])
    assert cfg["job"]["name"] == "diffusion_digits" and cfg["optim"]["lr"] > 0
    small = ["trainer.max_epochs=1", "job.num_samples=200", *TINY]
    result = run(compose_config(["job=diffusion_digits", *small]), LocalContext())
    assert result.status == "finished" and result.step > 0
    assert math.isfinite(result.metrics["train/loss_epoch"])
    assert math.isfinite(result.metrics["val/loss"])
    assert result.metrics["val/fid"] > 0 and result.metrics["val/fid_ratio"] > 1


def test_data_is_cnn_digits_split_repeated_per_epoch():
    cfg = DiffusionDigitsConfig(epoch_repeats=3)
    splits, reference = JOB.build_data(cfg), cnn_digits.build_data(cnn_digits.CnnDigitsConfig())
    assert torch.equal(splits.val[:][0], reference.val[:][0])
    assert torch.equal(splits.info["images"][:][0], reference.train[:][0])
    assert len(splits.train) == 3 * len(reference.train)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedules_decay_from_signal_to_noise(schedule):
    ab = alpha_bars(DiffusionDigitsConfig(schedule=schedule, timesteps=100))
    assert ab.shape == (100,) and ab[0] > 0.99 and ab[-1] < 0.01
    assert torch.all(ab[1:] < ab[:-1])


def test_schedule_switch_changes_the_model_and_bad_names_fail():
    cos = alpha_bars(DiffusionDigitsConfig(schedule="cosine"))
    lin = alpha_bars(DiffusionDigitsConfig(schedule="linear"))
    assert not torch.allclose(cos, lin, atol=1e-2)
    with pytest.raises(ValueError, match="job.schedule"):
        alpha_bars(DiffusionDigitsConfig(schedule="quadratic"))


def _model(**kw):
    cfg = DiffusionDigitsConfig(hidden=32, depth=1, timesteps=20, **kw)
    torch.manual_seed(0)
    return JOB.build_model(cfg, None), JOB.build_data(cfg)


def test_min_snr_weighting_only_lowers_the_training_loss():
    (weighted, splits), (plain, _) = _model(min_snr=1.0), _model(min_snr=0.0)
    batch = splits.val[:64]
    torch.manual_seed(1)
    a = JOB.training_step(weighted, batch)
    torch.manual_seed(1)
    b = JOB.training_step(plain, batch)
    assert a < b  # same weights, noise and timesteps; weights min(SNR, 1)/SNR ≤ 1


def test_held_out_loss_is_deterministic():
    model, splits = _model()
    batch = splits.val[:50]
    assert torch.equal(eval_step(model, batch)["loss"], eval_step(model, batch)["loss"])


def test_sampler_is_seeded_and_in_range():
    model, _ = _model()
    a, b, c = (model.sample(16, 5, eta, seed) for eta, seed in [(1.0, 0), (1.0, 0), (1.0, 1)])
    assert a.shape == (16, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(model.sample(16, 5, 0.0, 0), a)  # eta switches the sampler's noise


def test_export_is_the_denoiser_on_packed_inputs():
    model, splits = _model()
    exported, example = export(model.eval(), splits.val[:5])
    assert example.shape == (5, 65) and 0 <= example[:, 64].min() <= example[:, 64].max() < 1
    x_t, t = example[:, :64], (example[:, 64] * model.T).round().long()
    assert torch.allclose(exported(example), model(model.pack(x_t, t)))
    assert exported(example).shape == (5, 64)
