"""The ssm_selective_copy job in one process: config, task data, the selective SSM, the LSTM."""

import math

import numpy as np
import pytest
import torch

from jobs import ssm_selective_copy as sc
from orchestrator.cli import compose_config
from orchestrator.context import LocalContext
from orchestrator.job import EpochEnd, job_config
from orchestrator.loop import run

SMALL = [
    "job=ssm_selective_copy",
    "job.seq_len=16",
    "job.num_tokens=4",
    "job.train_size=128",
    "job.val_size=64",
    "job.d_model=16",
    "job.d_state=4",
    "job.lstm_epochs=1",
    "trainer.max_epochs=1",
    "trainer.batch_size=32",
]


def config(overrides=()):
    return job_config(sc.JOB, compose_config([*SMALL, *overrides])["job"])


def test_default_config_composes():
    cfg = compose_config(["job=ssm_selective_copy"])
    assert cfg["job"]["name"] == "ssm_selective_copy" and cfg["job"]["num_tokens"] >= 8


def test_a_few_steps_train_to_finite_metrics():
    result = run(compose_config(SMALL), LocalContext())
    assert result.status == "finished" and result.step > 0
    assert math.isfinite(result.metrics["val/loss"])
    assert 0 <= result.metrics["val/seq_acc"] <= result.metrics["val/acc"] <= 1


def test_task_data_is_deterministic_and_well_formed():
    cfg = config()
    a, b = sc.build_data(cfg), sc.build_data(cfg)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    x, y = a.val.tensors
    assert x.shape == (64, 16 + 4) and y.shape == (64, 4)
    assert (x[:, 16:] == sc.MARKER).all()
    for row, target in zip(x[:, :16], y, strict=True):
        data = row[row != sc.BLANK]  # the data tokens, in order, are what must be copied
        assert torch.equal(data, target) and (data >= sc.FIRST).all()
    # The held-out set doesn't move when the training set grows, and differs from it.
    bigger = sc.build_data(config(["job.train_size=512"]))
    assert torch.equal(bigger.val.tensors[0], x)
    assert not torch.equal(a.train.tensors[0][:64], x)


def test_too_many_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="job.num_tokens"):
        sc.build_data(config(["job.num_tokens=17"]))


def test_ssm_is_causal_and_selective():
    torch.manual_seed(0)
    block = sc.Mamba(8, 4)
    x = torch.randn(2, 12, 8)
    changed = x.clone()
    changed[:, 7:] += 1.0
    y, y2 = block(x), block(changed)
    assert torch.allclose(y[:, :7], y2[:, :7], atol=1e-6)  # the past ignores the future
    assert not torch.allclose(y[:, 7:], y2[:, 7:])
    # Selective: Δ (and so the state's decay) is computed from each input, per step and channel.
    deltas = []
    block.dt_proj.register_forward_hook(lambda module, args, out: deltas.append(out))
    block(x)
    assert deltas[0].shape == (2, 12, 16) and deltas[0].std(dim=1).min() > 0


def test_lstm_reference_has_about_the_ssms_parameter_count():
    cfg = config()
    splits = sc.build_data(cfg)
    ref = sc.references(cfg, splits)
    assert abs(ref["lstm_params"] - ref["ssm_params"]) / ref["ssm_params"] < 0.1
    assert 0 <= ref["lstm_acc"] <= 1
    ssm = sc.SeqModel(cfg, splits)
    assert ref["ssm_params"] == sum(p.numel() for p in ssm.parameters())
    assert any(isinstance(m, torch.nn.LSTM) for m in sc.SeqModel(cfg, splits, 32).modules())


class Sink:
    def __init__(self):
        self.images = {}

    def log_image(self, name, image, epoch):
        self.images[(name, epoch)] = image

    def log_text(self, name, text, epoch):
        raise AssertionError("no text expected")


def test_per_position_accuracy_plot_on_the_last_epoch():
    cfg = config()
    splits = sc.build_data(cfg)
    model = sc.SeqModel(cfg, splits).eval()
    sink = Sink()
    with torch.no_grad():
        for epoch in (1, 2):
            sc.position_report(EpochEnd(model, splits, cfg, epoch, 2, torch.device("cpu"), sink))
        acc = sc.position_accuracy(model, splits.val, torch.device("cpu"))
    assert list(sink.images) == [("position_accuracy", 2)]
    bars = sink.images[("position_accuracy", 2)].axes[0].patches
    assert np.allclose([bar.get_height() for bar in bars], acc) and len(acc) == 4
