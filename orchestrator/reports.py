"""Plots and tables reviewers want in MLflow, shared by jobs' `evaluate` hooks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from orchestrator.job import EpochEnd


def _figure(**kwargs):
    import matplotlib

    matplotlib.use("Agg")  # workers have no display
    import matplotlib.pyplot as plt

    return plt.figure(**kwargs)


def confusion_matrix_figure(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> Any:
    counts = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(counts, (y_true, y_pred), 1)
    fig = _figure(figsize=(1 + 0.45 * num_classes, 1 + 0.4 * num_classes))
    ax = fig.add_subplot()
    ax.imshow(counts, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        if n:
            ax.text(
                j,
                i,
                str(n),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if n > counts.max() / 2 else "black",
            )
    ax.set(
        xlabel="predicted",
        ylabel="true",
        xticks=range(num_classes),
        yticks=range(num_classes),
        title=f"held-out accuracy {np.trace(counts) / counts.sum():.4f}",
    )
    fig.tight_layout()
    return fig


def classifier_report(end: EpochEnd) -> dict[str, float]:
    """`evaluate` hook for classifiers: the confusion matrix on the held-out split, last epoch."""
    if not end.is_last:
        return {}
    x, y = end.splits.val[:]  # type: ignore[index]
    predicted = end.model(x.to(end.device)).argmax(1).cpu().numpy()
    end.log_image(
        "confusion_matrix",
        confusion_matrix_figure(y.numpy(), predicted, end.splits.info["num_classes"]),
    )
    return {}


def flat_numpy(dataset) -> tuple[np.ndarray, np.ndarray]:
    """A TensorDataset's inputs flattened per sample, and its targets, for sklearn baselines."""
    x, y = dataset[:]
    return x.reshape(len(x), -1).numpy(), torch.as_tensor(y).numpy()
