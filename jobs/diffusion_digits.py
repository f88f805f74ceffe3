"""DDPM-style diffusion on scikit-learn's 8×8 digits: a residual MLP predicts the added noise.

    orchestrate job=diffusion_digits
    orchestrate job=diffusion_digits job.schedule=linear job.timesteps=1000 job.sample_steps=100

Trains on cnn_digits' fixed 80 % split (pixels scaled to [-1, 1]) with min-SNR-weighted noise
MSE. Every `eval_every` epochs, DDIM samples from a fixed seed are scored as in gan_digits (val/fid
main metric); the default config evaluates and logs the weight EMA (trainer.ema_decay).
Logged model: the denoiser, N×65 (64 noisy pixels in [-1, 1], then t/timesteps) → noise N×64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from orchestrator.config import JobConfig
from orchestrator.generative import due, sample_report, scorer
from orchestrator.job import EpochEnd, JobSpec

from .gan_digits import build_data, references  # the same digits split and FID floor


@dataclass
class DiffusionDigitsConfig(JobConfig):
    name: str = "diffusion_digits"
    timesteps: int = 200
    schedule: str = "cosine"  # cosine | linear (DDPM's 1e-4 → 0.02, rescaled to `timesteps`)
    hidden: int = 256
    depth: int = 3  # residual blocks
    dropout: float = 0.0
    min_snr: float = 2.0  # loss weight min(SNR, γ)/SNR (Hang et al., 2023); 0 = plain MSE
    epoch_repeats: int = 1  # passes over the training images per epoch (fewer, longer epochs)
    sample_steps: int = 50  # DDIM steps when sampling (≤ timesteps)
    eta: float = 0.0  # 0 = deterministic DDIM, 1 = DDPM-like noise
    num_samples: int = 1000  # generated digits scored per evaluation
    sample_seed: int = 0
    eval_every: int = 10  # FID and sample grid every N epochs (and at the last)


def alpha_bars(cfg: DiffusionDigitsConfig) -> torch.Tensor:
    """ᾱ_t for t = 0..T−1: the share of signal variance left after t+1 noising steps."""
    T = cfg.timesteps
    if cfg.schedule == "linear":  # DDPM's 1e-4 → 0.02 over 1000 steps, rescaled to T steps
        return torch.cumprod(1 - torch.linspace(0.1 / T, 20 / T, T, dtype=torch.float64), 0).float()
    if cfg.schedule != "cosine":
        raise ValueError(f"job.schedule must be cosine or linear, got '{cfg.schedule}'")
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2)
    return ((f[1:] / f[0]) ** 2).clamp(min=1e-5).float()  # Nichol & Dhariwal (2021)


class Diffusion(nn.Module):
    """A residual MLP denoiser and its noise schedule. forward: N×65 (64 noisy pixels in
    [-1, 1], then t/T in [0, 1)) → predicted noise N×64; this is also the exported model."""

    def __init__(self, cfg: DiffusionDigitsConfig, pixels: int = 64):
        super().__init__()
        w, half, self.T, self.min_snr = cfg.hidden, 32, cfg.timesteps, cfg.min_snr
        self.register_buffer("ab", alpha_bars(cfg), persistent=False)
        self.register_buffer("freqs", torch.exp(-math.log(1e4) * torch.arange(half) / half))
        self.time_mlp = nn.Sequential(nn.Linear(2 * half, w), nn.SiLU(), nn.Linear(w, w))
        self.inp, self.out, self.norm = nn.Linear(pixels, w), nn.Linear(w, pixels), nn.LayerNorm(w)
        drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(w), nn.SiLU(), nn.Linear(w, w), nn.SiLU(), drop, nn.Linear(w, w)
            )
            for _ in range(cfg.depth)
        )

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        angles = 1000 * packed[:, -1:] * self.freqs
        temb = self.time_mlp(torch.cat([angles.sin(), angles.cos()], 1))
        h = self.inp(packed[:, :-1])
        for block in self.blocks:
            h = h + block(h + temb)
        return self.out(F.silu(self.norm(h)))

    def pack(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([x_t, t[:, None].float() / self.T], 1)

    @torch.no_grad()
    def sample(self, n: int, steps: int, eta: float, seed: int) -> torch.Tensor:
        """DDIM (Song et al., 2021) on `steps` evenly spaced timesteps → N×64 in [0, 1]."""
        gen, dev = torch.Generator().manual_seed(seed), self.ab.device
        x = torch.randn(n, 64, generator=gen).to(dev)
        ts = torch.linspace(self.T - 1, 0, steps).round().long().tolist()
        for t, prev in zip(ts, [*ts[1:], None], strict=True):
            ab, ab_prev = self.ab[t], self.ab[prev] if prev is not None else self.ab.new_ones(())
            eps = self(self.pack(x, torch.full((n,), t, device=dev)))
            x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # consistent with the clipped x0
            sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
            x = x + sigma * torch.randn(n, 64, generator=gen).to(dev)
        return (x + 1) / 2


def _losses(model: nn.Module, x: torch.Tensor, gen=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the noise MSE at a random timestep, and its min-SNR-γ weight."""
    inner = model.module if hasattr(model, "module") else model
    x0, ab = x.flatten(1) * 2 - 1, inner.ab
    t = torch.randint(0, inner.T, (len(x0),), generator=gen).to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    pred = model(inner.pack(ab[t, None].sqrt() * x0 + (1 - ab[t, None]).sqrt() * noise, t))
    snr = ab[t] / (1 - ab[t])  # the call above goes through DDP, so gradients sync
    return ((pred.float() - noise) ** 2).mean(1), snr.clamp(max=inner.min_snr or math.inf) / snr


def training_step(model: nn.Module, batch) -> torch.Tensor:
    mse, weight = _losses(model, batch[0])
    return (mse * weight).mean()


def eval_step(model: nn.Module, batch) -> dict[str, torch.Tensor]:  # fixed t and noise
    return {"loss": _losses(model, batch[0], torch.Generator().manual_seed(0))[0]}


def report(end: EpochEnd) -> dict[str, float]:
    cfg = end.config
    if not due(end, cfg.eval_every):
        return {}
    samples = end.model.sample(cfg.num_samples, cfg.sample_steps, cfg.eta, cfg.sample_seed)
    return sample_report(end, samples.cpu(), scorer(end.splits.info["images"], end.splits.val))


def export(model: nn.Module, batch) -> tuple[nn.Module, torch.Tensor]:
    """The denoiser, with held-out images noised at spread-out timesteps as the example."""
    x0, t = batch[0].flatten(1) * 2 - 1, torch.linspace(0, model.T - 1, len(batch[0])).long()
    noise, ab = torch.randn(x0.shape, generator=torch.Generator()), model.ab[t][:, None]
    return model, model.pack(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t)


JOB = JobSpec(
    config=DiffusionDigitsConfig,
    build_data=build_data,
    build_model=lambda cfg, splits: Diffusion(cfg),
    training_step=training_step,
    eval_step=eval_step,
    main_metric="val/fid",
    mode="min",
    evaluate=report,
    references=references,
    export=export,
)
