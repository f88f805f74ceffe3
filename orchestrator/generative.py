"""Quality of generated images: a Fréchet distance and class shares, for generative jobs.

FID (Heusel et al., 2017) compares Gaussians fitted to real and to generated images' Inception
features. Inception knows nothing about 8×8 digits and nothing may be downloaded at run time,
so here the feature extractor is a small MLP classifier trained deterministically, in seconds,
on the job's own *training* images; its last hidden layer gives the features. The same
classifier judges which class each generated image shows: a generator whose samples cover
every class in about its real share has not collapsed onto a few modes.

A job's `evaluate` hook (rank 0) scores a fixed number of samples, drawn from fixed seeds,
against the held-out images. The score is read against a floor: the same distance between the
training and the held-out real images (what a generator that reproduced its training set
exactly would score). `scorer` trains the classifier once per process and dataset and caches
it, with the held-out features and the floor:

    from orchestrator.generative import due, sample_report, scorer

    def references(cfg, splits):  # logged as baseline/fid_floor
        return {"fid_floor": scorer(splits.train, splits.val).floor}

    def report(end):  # JobSpec(evaluate=report, main_metric="val/fid", mode="min")
        if not due(end, every=10):
            return {}
        samples = ...  # N×1×8×8 (or N×64) in [0, 1], N ≥ 1000, from a fixed seed
        # logs a sample grid (and the class shares at the last epoch); returns val/fid,
        # val/fid_ratio (= fid / floor), val/min_class_share and val/max_class_share
        return sample_report(end, samples, scorer(end.splits.train, end.splits.val))

Datasets are (image, label) TensorDatasets; images are compared as flat pixel vectors, real and
generated on the same scale (here [0, 1]).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from orchestrator.job import EpochEnd


class FeatureClassifier(nn.Module):
    """MLP classifier whose last hidden layer is the feature space of the Fréchet distance."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(len(x), -1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    epochs: int = 30,
    batch_size: int = 64,
    seed: int = 0,
) -> FeatureClassifier:
    """Mini-batch AdamW on (x, y) from a fixed seed: the same data gives the same classifier,
    whatever the caller's random state (which this leaves untouched)."""
    x = x.reshape(len(x), -1).float().cpu()
    y = torch.as_tensor(y).long().cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureClassifier(x.shape[1], num_classes)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
        with torch.enable_grad():  # evaluate hooks run under no_grad
            for _ in range(epochs):
                for rows in torch.randperm(len(x)).split(batch_size):
                    # Light pixel noise keeps features smooth for images a little off the data.
                    noisy = x[rows] + 0.05 * torch.randn(len(rows), x.shape[1])
                    loss = F.cross_entropy(model(noisy), y[rows])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def features(classifier: FeatureClassifier, images: torch.Tensor) -> np.ndarray:
    return classifier.features(images.detach().cpu()).numpy()


@torch.no_grad()
def class_shares(classifier: FeatureClassifier, images: torch.Tensor) -> np.ndarray:
    """Fraction of `images` the classifier assigns to each class (sums to 1)."""
    logits = classifier(images.detach().cpu())
    counts = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
    return (counts.double() / len(images)).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½) between Gaussians fitted to rows of a, b.

    The matrix square roots come from symmetric eigendecompositions, which stay real and
    stable when a covariance is singular (dead ReLU units, fewer samples than features).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    sa_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(sa_half @ sb @ sa_half), 0, None)).sum()
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * cross)


@dataclass
class Scorer:
    """Scores generated images against one split's held-out images. Build it with `scorer`."""

    classifier: FeatureClassifier
    held_out: torch.Tensor  # real held-out images
    held_out_features: np.ndarray
    floor: float  # Fréchet distance between the training and the held-out real images

    def metrics(self, samples: torch.Tensor, prefix: str = "val/") -> dict[str, float]:
        """FID of `samples` against the held-out images, its ratio to the real-vs-real floor,
        and the smallest and largest class share among the samples."""
        fid = frechet_distance(features(self.classifier, samples), self.held_out_features)
        shares = class_shares(self.classifier, samples)
        return {
            f"{prefix}fid": fid,
            f"{prefix}fid_ratio": fid / self.floor,
            f"{prefix}min_class_share": float(shares.min()),
            f"{prefix}max_class_share": float(shares.max()),
        }

    def shares_table(self, samples: torch.Tensor) -> str:
        """Class shares of `samples` beside the held-out images', as a text table."""
        gen = class_shares(self.classifier, samples)
        real = class_shares(self.classifier, self.held_out)
        rows = [
            f"{c:>5}  {g:9.3f}  {r:8.3f}" for c, (g, r) in enumerate(zip(gen, real, strict=True))
        ]
        return "\n".join(["class  generated  held-out", *rows])


_SCORERS: dict[str, Scorer] = {}


def scorer(train: Dataset, held_out: Dataset, num_classes: int = 10) -> Scorer:
    """The scorer for these real (image, label) datasets, such as a job's `splits.train` and
    `splits.val` (TensorDatasets). Built on first use in this process (the classifier trains
    in seconds), then cached: every evaluation of a run reuses it."""
    x, y = train[:]  # type: ignore[index]
    x, y = x.reshape(len(x), -1).float().cpu(), torch.as_tensor(y).long().cpu()
    val = held_out[:][0].reshape(len(held_out), -1).float().cpu()  # type: ignore[index, arg-type]
    digest = hashlib.sha256()
    for part in (x, y, val):
        digest.update(part.numpy().tobytes())
    key = f"{digest.hexdigest()}-{num_classes}"
    if key not in _SCORERS:
        classifier = train_classifier(x, y, num_classes)
        val_features = features(classifier, val)
        floor = frechet_distance(features(classifier, x), val_features)
        _SCORERS[key] = Scorer(classifier, val, val_features, floor)
    return _SCORERS[key]


def due(end: EpochEnd, every: int) -> bool:
    """Whether an `evaluate` hook should sample this epoch: every `every` epochs and the last."""
    return end.is_last or (every > 0 and end.epoch % every == 0)


def sample_report(end: EpochEnd, samples: torch.Tensor, scores: Scorer) -> dict[str, float]:
    """For an `evaluate` hook: log a grid of the first 100 samples (and, at the last epoch, the
    class-share table) and return `scores.metrics(samples)`."""
    end.log_image("samples", sample_grid(samples[:100]))
    if end.is_last:
        end.log_text("class_shares", scores.shares_table(samples))
    return scores.metrics(samples)


def sample_grid(images: torch.Tensor | Any, ncols: int = 10, scale: int = 4) -> np.ndarray:
    """Square images (N×H×W, N×1×H×W or N×H·W, values in [0, 1]) tiled into one uint8 array,
    one pixel apart, each pixel enlarged `scale` times."""
    x = torch.as_tensor(images).detach().float().cpu()
    side = int(round(x[0].numel() ** 0.5))
    x = x.reshape(len(x), side, side).clamp(0, 1)
    nrows = -(-len(x) // ncols)
    cell = side + 1
    canvas = torch.full((nrows * cell + 1, ncols * cell + 1), 0.5)
    for i, image in enumerate(x):
        r, c = divmod(i, ncols)
        canvas[1 + r * cell : 1 + r * cell + side, 1 + c * cell : 1 + c * cell + side] = image
    grid = (canvas * 255).round().to(torch.uint8).numpy()
    return np.kron(grid, np.ones((scale, scale), dtype=np.uint8))
