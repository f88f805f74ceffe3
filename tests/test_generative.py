"""orchestrator/generative.py: the Fréchet distance, the digits scorer and the sample report."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from orchestrator import generative
from orchestrator.data import stratified_split, tensor_splits
from orchestrator.job import EpochEnd
from orchestrator.tracking import NullMetricLogger


@pytest.fixture(scope="module")
def splits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[:, None]
    x_tr, x_va, y_tr, y_va = stratified_split(x, digits.target, 0)
    return tensor_splits(x_tr, y_tr, x_va, y_va, num_classes=10)


@pytest.fixture(scope="module")
def scores(splits):
    return generative.scorer(splits.train, splits.val)


def test_frechet_distance_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(400, 6)) * 2 + 1
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(
        sa + sb - 2 * linalg.sqrtm(sa @ sb).real
    )
    assert generative.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert generative.frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_a_set_to_itself_is_zero_and_a_shift_adds_its_square():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 8))
    a[:, 3] = 0  # a dead feature: singular covariance must not break it
    assert generative.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    assert generative.frechet_distance(a, a + 0.5) == pytest.approx(8 * 0.25, rel=1e-6)


def test_scorer_is_deterministic_cached_and_leaves_the_global_rng_alone(splits, scores):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = generative.train_classifier(*splits.train[:], num_classes=10, epochs=2)
    twice = generative.train_classifier(*splits.train[:], num_classes=10, epochs=2)
    assert torch.rand(1) == before  # training used its own seed, not the caller's stream
    for p, q in zip(again.parameters(), twice.parameters(), strict=True):
        assert torch.equal(p, q)
    assert generative.scorer(splits.train, splits.val) is scores


def test_classifier_knows_digits_and_the_floor_is_small_but_positive(splits, scores):
    x, y = splits.val[:]
    assert (scores.classifier(x).argmax(1) == y).float().mean() > 0.93
    assert 0 < scores.floor < 5
    train_x = splits.train[:][0]
    assert scores.metrics(train_x)["val/fid"] == pytest.approx(scores.floor)
    assert scores.metrics(train_x)["val/fid_ratio"] == pytest.approx(1.0)


def test_fid_grows_with_distortion(splits, scores):
    x = splits.train[:][0]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    fids = [
        scores.metrics((x + level * noise).clamp(0, 1))["val/fid"] for level in (0, 0.1, 0.2, 0.4)
    ]
    assert fids == sorted(fids) and fids[-1] > 5 * fids[0]
    assert scores.metrics(torch.rand(1000, 64))["val/fid_ratio"] > 20


def test_class_shares_sum_to_one_and_expose_mode_collapse(splits, scores):
    x, y = splits.train[:]
    shares = generative.class_shares(scores.classifier, x)
    assert shares.sum() == pytest.approx(1.0) and shares.min() > 0.08
    collapsed = scores.metrics(x[y == 3])
    assert collapsed["val/min_class_share"] < 0.01 and collapsed["val/max_class_share"] > 0.9
    assert collapsed["val/fid_ratio"] > 10
    assert "class  generated  held-out" in scores.shares_table(x[y == 3])


def test_sample_grid_and_report(splits, scores):
    grid = generative.sample_grid(torch.rand(23, 1, 8, 8), ncols=10, scale=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 * (3 * 9 + 1), 2 * (10 * 9 + 1))
    sink = NullMetricLogger()
    end = EpochEnd(torch.nn.Identity(), splits, None, 5, 5, torch.device("cpu"), sink)
    metrics = generative.sample_report(end, splits.train[:][0], scores)
    assert set(metrics) == {
        "val/fid",
        "val/fid_ratio",
        "val/min_class_share",
        "val/max_class_share",
    }
    assert sink.artifacts == ["samples/epoch_005.png", "class_shares/epoch_005.txt"]
    assert generative.due(end, every=10)
    assert not generative.due(EpochEnd(None, splits, None, 3, 5, None, sink), every=2)  # type: ignore[arg-type]
