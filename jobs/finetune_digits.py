"""Fine-tuning: a digit classifier on 5 % of the labels, its encoder from autoencoder_digits.

    orchestrate job=autoencoder_digits tracking.register_as=digits_ae   # pretrain, then:
    orchestrate job=finetune_digits job.init_from=models:/digits_ae@champion
    orchestrate job=finetune_digits job.init_from=/abs/path/checkpoint_dir job.freeze_encoder=false
    orchestrate job=finetune_digits              # init_from=null: the same network from scratch

`job.init_from`: an MLflow model URI (models:/name@alias, runs:/<id>/model, from tracking.uri) or
an autoencoder_digits checkpoint directory (absolute): its `encoder.*` weights are loaded. Trains
on 5 % of cnn_digits' labels; reference: the same network from scratch on the same labels.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from orchestrator import checkpoint
from orchestrator.config import JobConfig
from orchestrator.data import stratified_split, tensor_splits
from orchestrator.errors import UserError
from orchestrator.job import JobSpec, Splits, classification_eval_step
from orchestrator.loop import build_optimizer, build_scheduler
from orchestrator.reports import classifier_report

from .autoencoder_digits import build_encoder


@dataclass
class FinetuneDigitsConfig(JobConfig):
    name: str = "finetune_digits"
    init_from: str | None = None  # models:/name@alias, runs:/..., or a checkpoint directory
    freeze_encoder: bool = True  # train the head only (beats tuning it all on 5 %); needs init_from
    label_fraction: float = 0.05  # of the training split, stratified
    label_seed: int = 0  # which images keep their labels
    latent_dim: int = 8  # the encoder: as the pretrained autoencoder's
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    layer_norm: bool = True
    head_hidden: int = 128  # 0 = a linear head on the latent
    dropout: float = 0.2  # in the head, and in the encoder's hidden layers when it trains
    noise_std: float = 0.1  # Gaussian input noise in training (as in pretraining)


class Classifier(nn.Module):
    def __init__(self, cfg: FinetuneDigitsConfig):
        super().__init__()
        frozen = cfg.freeze_encoder and cfg.init_from is not None  # from scratch, all of it trains
        self.encoder = build_encoder(cfg, 0.0 if frozen else cfg.dropout).requires_grad_(not frozen)
        width = cfg.head_hidden or cfg.latent_dim
        hidden = [nn.Linear(cfg.latent_dim, width), nn.ReLU()] if cfg.head_hidden else []
        self.head = nn.Sequential(*hidden, nn.Dropout(cfg.dropout), nn.Linear(width, 10))
        self.noise_std = cfg.noise_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noisy = self.training and self.noise_std > 0
        return self.head(self.encoder(x + self.noise_std * torch.randn_like(x) if noisy else x))


def pretrained_encoder(init_from: str) -> dict[str, torch.Tensor]:
    """The `encoder.*` weights of an autoencoder_digits model (MLflow URI) or checkpoint. MLflow
    logs with torch.export: such a model loads as a GraphModule keeping the parameter names."""
    if re.match(r"[a-zA-Z][\w+.-]*:/", init_from):  # models:/..., runs:/..., s3://...
        import mlflow.pytorch

        state = mlflow.pytorch.load_model(init_from, map_location="cpu").state_dict()
    elif not os.path.isabs(init_from):  # workers run in directories of their own
        raise UserError("job.init_from", f"{init_from} is relative", "give an absolute path")
    else:
        state = checkpoint.load(init_from)["model"]  # checks its SHA-256; weights only
    return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}


def build_model(cfg: FinetuneDigitsConfig, splits: Splits) -> nn.Module:
    model = Classifier(cfg)
    if cfg.init_from:
        try:
            model.encoder.load_state_dict(pretrained_encoder(cfg.init_from))
        except RuntimeError as exc:  # not an autoencoder_digits model, or other layer sizes
            why = str(exc).splitlines()[-1].strip()
            fix = "use an autoencoder_digits model; set job.hidden/latent_dim/layer_norm as it had"
            raise UserError("job.init_from", f"its encoder does not fit ({why})", fix) from exc
    return model


def build_data(cfg: FinetuneDigitsConfig) -> Splits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[:, None]  # N×1×8×8 in [0, 1], as pretrained
    x_tr, x_va, y_tr, y_va = stratified_split(x, digits.target, cfg.split_seed)
    x_lab, _, y_lab, _ = train_test_split(
        x_tr, y_tr, train_size=cfg.label_fraction, stratify=y_tr, random_state=cfg.label_seed
    )
    return tensor_splits(x_lab, y_lab, x_va, y_va, num_classes=10)


def training_step(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


# The from-scratch recipe: this job's default config replayed in one process (a test checks).
SCRATCH = {"epochs": 150, "batch": 32}
SCRATCH_OPTIM = {"name": "adamw", "lr": 1e-2, "weight_decay": 0.01, "betas": [0.9, 0.999]}
SCRATCH_SCHED = {"name": "cosine", "warmup_epochs": 1, "min_lr_ratio": 0.01}


def scratch_accuracy(cfg: FinetuneDigitsConfig, splits: Splits, seed: int) -> float:
    """The same network trained from scratch on the same labelled images; deterministic."""
    torch.manual_seed(seed)
    model = build_model(FinetuneDigitsConfig(**{**vars(cfg), "init_from": None}), splits).train()
    x, y = splits.train[:]  # type: ignore[index]
    opt = build_optimizer(model.parameters(), SCRATCH_OPTIM)
    sched = build_scheduler(opt, SCRATCH_SCHED, -(-len(x) // SCRATCH["batch"]), SCRATCH["epochs"])
    for _ in range(SCRATCH["epochs"]):
        for idx in torch.randperm(len(x)).split(SCRATCH["batch"]):
            opt.zero_grad()
            training_step(model, (x[idx], y[idx])).backward()
            opt.step()
            sched.step()
    x_va, y_va = splits.val[:]  # type: ignore[index]
    with torch.no_grad():
        return (model.eval()(x_va).argmax(1) == y_va).float().mean().item()


def references(cfg: FinetuneDigitsConfig, splits: Splits) -> dict[str, float]:
    # Mean of a few initialisations: one from-scratch run on 71 images varies by ±2 points.
    with torch.random.fork_rng():
        accs = [scratch_accuracy(cfg, splits, seed) for seed in range(3)]
    return {"scratch_acc": sum(accs) / len(accs)}


JOB = JobSpec(
    config=FinetuneDigitsConfig,
    build_data=build_data,
    build_model=build_model,
    training_step=training_step,
    eval_step=classification_eval_step,
    main_metric="val/acc",
    mode="max",
    evaluate=classifier_report,
    references=references,
    model_sources=("init_from",),
)
