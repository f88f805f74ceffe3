"""gan_digits: composes, trains a few steps, one backward gives each network its own gradient."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from jobs import cnn_digits
from jobs.gan_digits import JOB, GanDigitsConfig, eval_step, export
from orchestrator.cli import compose_config
from orchestrator.context import LocalContext
from orchestrator.loop import run


def test_composes_and_trains_a_few_steps_to_the_main_metric():
    cfg = compose_config(["job=gan_digits"])
    assert cfg["optim"]["betas"] == [0.5, 0.999]
    small = [
        "trainer.max_epochs=1",
        "job.num_samples=200",
        "job.g_hidden=[32]",
        "job.d_hidden=[32]",
    ]
    result = run(compose_config(["job=gan_digits", *small]), LocalContext())
    assert result.status == "finished" and result.step > 0
    assert math.isfinite(result.metrics["train/loss_epoch"])
    assert 0 < result.metrics["val/d_real"] < 1 and 0 < result.metrics["val/d_fake"] < 1
    assert result.metrics["val/fid"] > 0 and 0 <= result.metrics["val/min_class_share"] <= 0.1


def test_data_is_cnn_digits_split_repeated_per_epoch():
    splits = JOB.build_data(GanDigitsConfig(epoch_repeats=2))
    reference = cnn_digits.build_data(cnn_digits.CnnDigitsConfig())
    assert torch.equal(splits.val[:][0], reference.val[:][0])
    assert torch.equal(splits.info["images"][:][0], reference.train[:][0])
    assert len(splits.train) == 2 * len(reference.train)


def _gan(**kw):
    cfg = GanDigitsConfig(g_hidden=[32], d_hidden=[32, 16], d_dropout=0.0, **kw)
    torch.manual_seed(0)
    return JOB.build_model(cfg, None).train(), JOB.build_data(cfg).val[:32][0]


def _grads(params):
    return [p.grad.clone() for p in params]


def test_one_backward_gives_d_its_loss_gradient_and_g_its_loss_gradient():
    gan, real = _gan(label_smoothing=0.1)
    torch.manual_seed(1)
    gan(real).backward()
    total_d, total_g = _grads(gan.D.parameters()), _grads(gan.G.parameters())

    # The same forward by hand (same noise), each loss differentiated for its own network only.
    torch.manual_seed(1)
    fake = gan.G(torch.randn(len(real), gan.z_dim))
    d_real, d_fake = gan.D(real.flatten(1)), gan.D(fake.detach())
    d_loss = F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, 0.9))
    d_loss = d_loss + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
    g_out = gan.D(fake)
    g_loss = F.binary_cross_entropy_with_logits(g_out, torch.ones_like(g_out))
    own_d = torch.autograd.grad(d_loss, list(gan.D.parameters()), retain_graph=True)
    own_g = torch.autograd.grad(g_loss, list(gan.G.parameters()), retain_graph=True)
    for got, want in zip(total_d + total_g, [*own_d, *own_g], strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    # And D's gradient is not the gradient of the summed loss (G's loss would push D to be fooled).
    mixed = torch.autograd.grad(d_loss + g_loss, list(gan.D.parameters()), allow_unused=True)
    assert not all(torch.allclose(a, b) for a, b in zip(mixed, own_d, strict=True))


def test_spectral_norm_switch_reparametrises_d_and_still_trains():
    gan, real = _gan(spectral_norm=True)
    names = [n for n, _ in gan.D.named_parameters()]
    assert any("parametrizations" in n for n in names)
    assert not any("parametrizations" in n for n, _ in _gan()[0].D.named_parameters())
    loss = gan(real)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None for p in gan.parameters())


def test_held_out_eval_is_deterministic_and_export_is_the_generator():
    gan, real = _gan()
    gan.eval()
    a, b = eval_step(gan, (real,)), eval_step(gan, (real,))
    assert torch.equal(a["loss"], b["loss"]) and a["d_real"].shape == (32,)
    generator, noise = export(gan, (real[:5],))
    assert generator is gan.G and noise.shape == (5, gan.z_dim)
    images = generator(noise)
    assert images.shape == (5, 64) and images.min() >= 0 and images.max() <= 1
