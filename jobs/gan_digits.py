"""GAN on scikit-learn's 8×8 digits: MLP generator and discriminator, trained simultaneously.

    orchestrate job=gan_digits
    orchestrate job=gan_digits job.spectral_norm=true job.label_smoothing=0 job.d_dropout=0

One module, one loss, one backward: forward(real) returns D's loss (on real and on detached
fakes) plus G's non-saturating loss, which passes the fakes through a copy of D with detached
parameters, so each network gets only its own gradient and one optimizer step updates both.
Every `eval_every` epochs and at the last, `num_samples` digits from fixed noise are scored by
orchestrator/generative.py: val/fid against the held-out 20 % of cnn_digits' split, beside
baseline/fid_floor (training vs held-out digits), val/fid_ratio, class shares (mode collapse).
The logged model is the generator: noise N×z_dim → images N×1×8×8 in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils.data import ConcatDataset

from orchestrator.config import JobConfig
from orchestrator.data import stratified_split, tensor_splits
from orchestrator.generative import due, sample_report, scorer
from orchestrator.job import EpochEnd, JobSpec, Splits


@dataclass
class GanDigitsConfig(JobConfig):
    name: str = "gan_digits"
    z_dim: int = 32
    g_hidden: list[int] = field(default_factory=lambda: [256, 256])
    d_hidden: list[int] = field(default_factory=lambda: [256, 256])
    g_batch_norm: bool = True
    d_dropout: float = 0.3
    spectral_norm: bool = False  # on D's linear layers
    minibatch_std: bool = True  # D also sees the batch's feature spread (against mode collapse)
    label_smoothing: float = 0.1  # one-sided: D's target for real images is 1 − this
    epoch_repeats: int = 1  # passes over the training images per epoch (fewer, longer epochs)
    num_samples: int = 1000  # generated digits scored per evaluation
    sample_seed: int = 0
    eval_every: int = 10  # FID and sample grid every N epochs (and at the last)


class MinibatchStd(nn.Module):
    """Appends the mean over features of the batch standard deviation (Karras et al., 2018)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        spread = h.std(0).mean().expand(len(h), 1) if len(h) > 1 else h.new_zeros(len(h), 1)
        return torch.cat([h, spread], 1)


class Gan(nn.Module):
    def __init__(self, cfg: GanDigitsConfig, pixels: int = 64):
        super().__init__()
        self.z_dim, self.smoothing = cfg.z_dim, cfg.label_smoothing
        g: list[nn.Module] = []
        for a, b in zip([cfg.z_dim, *cfg.g_hidden], cfg.g_hidden, strict=False):
            g += [nn.Linear(a, b), nn.BatchNorm1d(b) if cfg.g_batch_norm else nn.Identity()]
            g.append(nn.ReLU())
        self.G = nn.Sequential(*g, nn.Linear(cfg.g_hidden[-1], pixels), nn.Sigmoid())
        sn = nn.utils.parametrizations.spectral_norm if cfg.spectral_norm else (lambda m: m)
        d: list[nn.Module] = []
        for a, b in zip([pixels, *cfg.d_hidden], cfg.d_hidden, strict=False):
            d += [sn(nn.Linear(a, b)), nn.LeakyReLU(0.2), nn.Dropout(cfg.d_dropout)]
        std = cfg.minibatch_std
        self.D = nn.Sequential(*d, *([MinibatchStd()] if std else []))
        self.D.append(sn(nn.Linear(cfg.d_hidden[-1] + std, 1)))

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        return self.G(z).view(len(z), 1, 8, 8)

    def forward(self, real: torch.Tensor) -> torch.Tensor:
        """D loss + G loss for one batch of real images; backward gives each net its gradient."""
        fake = self.G(torch.randn(len(real), self.z_dim, device=real.device))
        d_real, d_fake = self.D(real.flatten(1)), self.D(fake.detach())
        d_loss = F.binary_cross_entropy_with_logits(
            d_real, torch.full_like(d_real, 1 - self.smoothing)
        ) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        frozen = {n: p.detach() for n, p in self.D.named_parameters()}
        d_on_fake = functional_call(self.D, frozen | dict(self.D.named_buffers()), (fake,))
        return d_loss + F.binary_cross_entropy_with_logits(d_on_fake, torch.ones_like(d_on_fake))


def build_data(cfg: GanDigitsConfig) -> Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[:, None]  # N×1×8×8 in [0, 1]
    x_tr, x_va, y_tr, y_va = stratified_split(x, digits.target, cfg.split_seed)
    splits = tensor_splits(x_tr, y_tr, x_va, y_va, num_classes=10)
    splits.info["images"] = splits.train  # each training image once, for the FID scorer
    splits.train = ConcatDataset([splits.train] * cfg.epoch_repeats)
    return splits


def training_step(model: nn.Module, batch) -> torch.Tensor:
    return model(batch[0])  # through the DDP wrapper, so both nets' gradients are all-reduced


def eval_step(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """Per held-out image: D's loss, and D's probability for it and for one fixed fake."""
    gan, x = (model.module if hasattr(model, "module") else model), batch[0]
    z = torch.randn(len(x), gan.z_dim, generator=torch.Generator().manual_seed(0))
    d_real, d_fake = gan.D(x.flatten(1))[:, 0], gan.D(gan.G(z.to(x.device)))[:, 0]
    loss = F.softplus(-d_real) + F.softplus(d_fake)  # BCE with targets 1 (real) and 0 (fake)
    return {"loss": loss, "d_real": torch.sigmoid(d_real), "d_fake": torch.sigmoid(d_fake)}


def references(cfg: GanDigitsConfig, splits: Splits) -> dict[str, float]:
    return {"fid_floor": scorer(splits.info["images"], splits.val).floor}


def report(end: EpochEnd) -> dict[str, float]:
    cfg, gan = end.config, end.model
    if not due(end, cfg.eval_every):
        return {}
    z = torch.randn(
        cfg.num_samples, cfg.z_dim, generator=torch.Generator().manual_seed(cfg.sample_seed)
    )
    samples = gan.generate(z.to(end.device)).cpu()
    return sample_report(end, samples, scorer(end.splits.info["images"], end.splits.val))


def export(model: nn.Module, batch) -> tuple[nn.Module, torch.Tensor]:
    """The generator (N×z_dim noise → N×64 pixels in [0, 1]), with fixed noise as the example."""
    return model.G, torch.randn(
        len(batch[0]), model.z_dim, generator=torch.Generator().manual_seed(0)
    )


JOB = JobSpec(
    config=GanDigitsConfig,
    build_data=build_data,
    build_model=lambda cfg, splits: Gan(cfg),
    training_step=training_step,
    eval_step=eval_step,
    main_metric="val/fid",
    mode="min",
    evaluate=report,
    references=references,
    export=export,
)
