"""Small data helpers shared by jobs: fixed stratified splits and standardisation."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from orchestrator.job import Splits

HELD_OUT_FRACTION = 0.2


def stratified_split(
    x: np.ndarray, y: np.ndarray, seed: int, held_out: float = HELD_OUT_FRACTION
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed held-out split every job and every baseline uses (same seed ⇒ same rows)."""
    from sklearn.model_selection import train_test_split

    x_tr, x_va, y_tr, y_va = train_test_split(
        x, y, test_size=held_out, stratify=y, random_state=seed
    )
    return x_tr, x_va, y_tr, y_va


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale by the training split's statistics only (no leakage from held-out data)."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return [(a - mean) / std for a in (train, *others)]


def tensor_splits(x_tr, y_tr, x_va, y_va, **info) -> Splits:
    def ds(x, y):
        return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y))

    return Splits(train=ds(x_tr, y_tr), val=ds(x_va, y_va), info=info)
