"""CNN on scikit-learn's 8×8 handwritten digits, with augmentation, batch norm and dropout.

    orchestrate job=cnn_digits
    orchestrate job=cnn_digits job.channels=64 job.dropout=0.3 job.augment=false

Held-out: a fixed stratified 20 % split (360 images). Reference: an RBF SVM on the same split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from orchestrator.config import JobConfig
from orchestrator.data import stratified_split, tensor_splits
from orchestrator.job import JobSpec, Splits, classification_eval_step
from orchestrator.reports import classifier_report, flat_numpy


@dataclass
class CnnDigitsConfig(JobConfig):
    name: str = "cnn_digits"
    channels: int = 32  # width of the first block; the second block doubles it
    dropout: float = 0.25
    batch_norm: bool = True
    augment: bool = True
    max_shift_px: float = 1.0  # random translation, in pixels
    max_rotate_deg: float = 10.0
    max_scale: float = 0.1  # random zoom in [1 - s, 1 + s]


class RandomAffine(nn.Module):
    """Random shift/rotation/zoom per image, in training mode only (identity in eval)."""

    def __init__(self, shift_px: float, rotate_deg: float, scale: float, size: int = 8):
        super().__init__()
        self.shift = 2 * shift_px / size  # affine_grid works in [-1, 1] coordinates
        self.rotate = math.radians(rotate_deg)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        n = x.shape[0]

        def uniform(a: float) -> torch.Tensor:
            return (torch.rand(n, device=x.device) * 2 - 1) * a

        angle, zoom = uniform(self.rotate), 1 + uniform(self.scale)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [
                torch.stack([cos, -sin, uniform(self.shift)], 1),
                torch.stack([sin, cos, uniform(self.shift)], 1),
            ],
            1,
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def conv_block(c_in: int, c_out: int, batch_norm: bool) -> nn.Sequential:
    norm = nn.BatchNorm2d if batch_norm else nn.Identity
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        norm(c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        norm(c_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def build_model(cfg: CnnDigitsConfig, splits: Splits) -> nn.Module:
    c = cfg.channels
    augment = (
        RandomAffine(cfg.max_shift_px, cfg.max_rotate_deg, cfg.max_scale)
        if cfg.augment
        else nn.Identity()
    )
    return nn.Sequential(
        augment,
        conv_block(1, c, cfg.batch_norm),  # 8×8 → 4×4
        conv_block(c, 2 * c, cfg.batch_norm),  # 4×4 → 2×2
        nn.Flatten(),
        nn.Dropout(cfg.dropout),
        nn.Linear(2 * c * 4, 128),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(128, 10),
    )


def build_data(cfg: CnnDigitsConfig) -> Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[:, None]  # N×1×8×8 in [0, 1]
    x_tr, x_va, y_tr, y_va = stratified_split(x, digits.target, cfg.split_seed)
    return tensor_splits(x_tr, y_tr, x_va, y_va, num_classes=10)


def references(cfg: CnnDigitsConfig, splits: Splits) -> dict[str, float]:
    from sklearn.svm import SVC

    x_tr, y_tr = flat_numpy(splits.train)
    x_va, y_va = flat_numpy(splits.val)
    return {"svm_rbf_acc": SVC(kernel="rbf").fit(x_tr, y_tr).score(x_va, y_va)}


def training_step(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


JOB = JobSpec(
    config=CnnDigitsConfig,
    build_data=build_data,
    build_model=build_model,
    training_step=training_step,
    eval_step=classification_eval_step,
    main_metric="val/acc",
    mode="max",
    evaluate=classifier_report,
    references=references,
)
