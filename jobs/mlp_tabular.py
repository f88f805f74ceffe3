"""MLP on scikit-learn's breast-cancer data (30 standardised features, 2 classes).

    orchestrate job=mlp_tabular
    orchestrate job=mlp_tabular job.hidden=[128,64] job.dropout=0.2

Held-out: a fixed stratified 20 % split (114 patients); features standardised with the
training split's statistics only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from orchestrator.config import JobConfig
from orchestrator.data import standardise, stratified_split, tensor_splits
from orchestrator.job import JobSpec, Splits, classification_eval_step
from orchestrator.reports import classifier_report, flat_numpy


@dataclass
class MlpTabularConfig(JobConfig):
    name: str = "mlp_tabular"
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.2
    batch_norm: bool = False


def build_data(cfg: MlpTabularConfig) -> Splits:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x_tr, x_va, y_tr, y_va = stratified_split(
        data.data.astype("float32"), data.target, cfg.split_seed
    )
    x_tr, x_va = standardise(x_tr, x_va)
    return tensor_splits(x_tr, y_tr, x_va, y_va, num_features=x_tr.shape[1], num_classes=2)


def build_model(cfg: MlpTabularConfig, splits: Splits) -> nn.Module:
    layers: list[nn.Module] = []
    width = splits.info["num_features"]
    for h in cfg.hidden:
        layers += [
            nn.Linear(width, h),
            nn.BatchNorm1d(h) if cfg.batch_norm else nn.Identity(),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
        ]
        width = h
    layers.append(nn.Linear(width, splits.info["num_classes"]))
    return nn.Sequential(*layers)


def references(cfg: MlpTabularConfig, splits: Splits) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    x_tr, y_tr = flat_numpy(splits.train)
    x_va, y_va = flat_numpy(splits.val)
    return {"logreg_acc": LogisticRegression(max_iter=5000).fit(x_tr, y_tr).score(x_va, y_va)}


def training_step(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


JOB = JobSpec(
    config=MlpTabularConfig,
    build_data=build_data,
    build_model=build_model,
    training_step=training_step,
    eval_step=classification_eval_step,
    main_metric="val/acc",
    mode="max",
    evaluate=classifier_report,
    references=references,
)
