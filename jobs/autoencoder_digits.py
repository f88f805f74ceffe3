"""Denoising autoencoder on scikit-learn's 8×8 digits: MLP encoder → small latent → decoder.

    orchestrate job=autoencoder_digits
    orchestrate job=autoencoder_digits job.latent_dim=4 job.noise_std=0.2
    orchestrate job=autoencoder_digits job.anomaly_class=9      # anomaly detection (AUROC)
    orchestrate job=autoencoder_digits tracking.register_as=digits_ae   # for finetune_digits

Held-out: cnn_digits' fixed stratified 20 % split, pixels in [0, 1]. Main metric: held-out
MSE per pixel; reference: PCA with latent_dim components fit on the same training images.
`job.anomaly_class=k` trains without digit k and adds val/auroc (k = positive, score =
reconstruction error) beside PCA's. The logged model maps 1×8×8 images to reconstructions;
its `encoder` submodule (image → latent) is what finetune_digits reuses."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from orchestrator.config import JobConfig
from orchestrator.data import stratified_split, tensor_splits
from orchestrator.job import EpochEnd, JobSpec, Splits
from orchestrator.reports import flat_numpy

from .cnn_digits import RandomAffine


@dataclass
class AutoencoderDigitsConfig(JobConfig):
    name: str = "autoencoder_digits"
    latent_dim: int = 8
    hidden: list[int] = field(default_factory=lambda: [256, 128])  # encoder widths; decoder mirrors
    dropout: float = 0.0
    layer_norm: bool = True
    # Denoising (training only): reconstruct the clean image from one with pixel noise and a
    # small random shift/rotation/zoom; the latter makes the latent less pose-sensitive.
    noise_std: float = 0.1
    max_shift_px: float = 0.5
    max_rotate_deg: float = 15.0
    max_scale: float = 0.15
    anomaly_class: int | None = None  # train without this digit; report AUROC for spotting it
    image_every: int = 25  # log the reconstructions grid every N epochs (and at the last)


def mlp(sizes: list[int], dropout: float, layer_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1], strict=True):
        norm = nn.LayerNorm(b) if layer_norm else nn.Identity()
        layers += [nn.Linear(a, b), norm, nn.ReLU(), nn.Dropout(dropout)]
    return [*layers, nn.Linear(sizes[-2], sizes[-1])]


def build_encoder(cfg, dropout: float) -> nn.Sequential:
    """1×8×8 image → latent; finetune_digits builds the same module and loads its weights."""
    sizes = [64, *cfg.hidden, cfg.latent_dim]
    return nn.Sequential(nn.Flatten(), *mlp(sizes, dropout, cfg.layer_norm))


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderDigitsConfig):
        super().__init__()
        self.encoder = build_encoder(cfg, cfg.dropout)
        sizes = [cfg.latent_dim, *reversed(cfg.hidden), 64]
        self.decoder = nn.Sequential(
            *mlp(sizes, cfg.dropout, cfg.layer_norm), nn.Sigmoid(), nn.Unflatten(1, (1, 8, 8))
        )
        self.noise_std = cfg.noise_std
        self.jitter = RandomAffine(cfg.max_shift_px, cfg.max_rotate_deg, cfg.max_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # corrupt the input; training_step compares with the clean one
            x = self.jitter(x) + self.noise_std * torch.randn_like(x)
        return self.decoder(self.encoder(x))


def build_model(cfg: AutoencoderDigitsConfig, splits: Splits) -> nn.Module:
    return Autoencoder(cfg)  # images in [0, 1] → reconstructions in [0, 1]


def build_data(cfg: AutoencoderDigitsConfig) -> Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[:, None]  # N×1×8×8 in [0, 1]
    x_tr, x_va, y_tr, y_va = stratified_split(x, digits.target, cfg.split_seed)
    if cfg.anomaly_class is not None:  # the anomalous digit is never seen in training
        x_tr, y_tr = x_tr[y_tr != cfg.anomaly_class], y_tr[y_tr != cfg.anomaly_class]
    return tensor_splits(x_tr, y_tr, x_va, y_va, num_classes=10)


def references(cfg: AutoencoderDigitsConfig, splits: Splits) -> dict[str, float]:
    from sklearn.decomposition import PCA
    from sklearn.metrics import roc_auc_score

    (x_tr, _), (x_va, y_va) = flat_numpy(splits.train), flat_numpy(splits.val)
    pca = PCA(cfg.latent_dim, random_state=0).fit(x_tr)
    err = ((pca.inverse_transform(pca.transform(x_va)) - x_va) ** 2).mean(1)
    out = {f"pca{cfg.latent_dim}_mse": float(err.mean())}
    if cfg.anomaly_class is not None:
        out[f"pca{cfg.latent_dim}_auroc"] = roc_auc_score(y_va == cfg.anomaly_class, err)
    return out


def training_step(model: nn.Module, batch) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[0])  # the model corrupts its input in training


def eval_step(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    x = batch[0]
    mse = ((model(x).float() - x) ** 2).flatten(1).mean(1)
    return {"loss": mse, "mse": mse}  # the training loss is the MSE; both names for the UI


def grid(x: torch.Tensor, recon: torch.Tensor) -> np.ndarray:
    """Originals (top row) over reconstructions (bottom row), gray-framed, upscaled uint8."""
    framed = [F.pad(t[:, 0].clamp(0, 1), (1, 1, 1, 1), value=0.5) for t in (x, recon)]
    image = torch.cat([torch.cat(list(t), dim=1) for t in framed], dim=0)
    return np.kron((image * 255).to(torch.uint8).numpy(), np.ones((6, 6), dtype=np.uint8))


def report(end: EpochEnd) -> dict[str, float]:
    cfg = end.config
    x, y = end.splits.val[:]  # type: ignore[index]
    recon = end.model(x.to(end.device)).cpu()
    if end.is_last or end.epoch % cfg.image_every == 0:
        picks = torch.cat([torch.nonzero(y == c)[:2, 0] for c in range(10)])  # 2 per digit
        end.log_image("reconstructions", grid(x[picks], recon[picks]))
    if cfg.anomaly_class is None:
        return {}
    from sklearn.metrics import roc_auc_score

    score = ((recon - x) ** 2).flatten(1).mean(1).numpy()
    return {"val/auroc": float(roc_auc_score((y == cfg.anomaly_class).numpy(), score))}


JOB = JobSpec(
    config=AutoencoderDigitsConfig,
    build_data=build_data,
    build_model=build_model,
    training_step=training_step,
    eval_step=eval_step,
    main_metric="val/mse",
    mode="min",
    evaluate=report,
    references=references,
)
