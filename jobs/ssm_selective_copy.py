"""Mamba-style selective state-space model on selective copying (Gu & Dao 2023, §3.1, Fig. 2).

    orchestrate job=ssm_selective_copy
    orchestrate job=ssm_selective_copy job.seq_len=128 job.num_tokens=16 job.d_state=8

`num_tokens` data tokens among `seq_len` blanks, then markers where the model must emit them in
order (fixed-seed data). Metric: held-out token accuracy; reference: an LSTM of equal size."""

from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no global figure state, no display
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from orchestrator.config import JobConfig
from orchestrator.job import EpochEnd, JobSpec, Splits

BLANK, MARKER, FIRST = 0, 1, 2  # token ids; the data tokens are FIRST, FIRST + 1, ...


@dataclass
class SsmSelectiveCopyConfig(JobConfig):
    name: str = "ssm_selective_copy"
    seq_len: int = 64  # blanks and data tokens, before the markers
    num_tokens: int = 8  # data tokens to copy
    vocab: int = 8  # distinct data tokens
    train_size: int = 20_000
    val_size: int = 2_000
    d_model: int = 64
    n_layer: int = 2
    d_state: int = 16
    dropout: float = 0.0
    lstm_epochs: int = 3  # training of the reference LSTM (batch 64, AdamW, lr 3e-3)


def make_set(cfg: SsmSelectiveCopyConfig, n: int, seed: int) -> TensorDataset:
    rng = np.random.default_rng(seed)
    where = np.sort(rng.random((n, cfg.seq_len)).argsort(1)[:, : cfg.num_tokens], 1)
    tokens = rng.integers(FIRST, FIRST + cfg.vocab, (n, cfg.num_tokens))
    x = np.concatenate([np.full((n, cfg.seq_len), BLANK), np.full_like(tokens, MARKER)], 1)
    np.put_along_axis(x, where, tokens, 1)
    return TensorDataset(torch.as_tensor(x), torch.as_tensor(tokens))


def build_data(cfg: SsmSelectiveCopyConfig) -> Splits:
    if not 0 < cfg.num_tokens <= cfg.seq_len:
        raise ValueError(f"job.num_tokens must be in [1, job.seq_len], got {cfg.num_tokens}")
    train = make_set(cfg, cfg.train_size, 2 * cfg.split_seed + 1)  # val: own seed, fixed size
    return Splits(train, make_set(cfg, cfg.val_size, 2 * cfg.split_seed))


class Mamba(nn.Module):  # gated: causal depthwise conv, input-dependent Δ, B, C; diagonal A
    def __init__(self, d: int, n: int, expand: int = 2, d_conv: int = 4):
        super().__init__()
        e, self.n, self.r = expand * d, n, -(-d // 16)  # expanded width, state, Δ's rank
        self.in_proj, self.out_proj = nn.Linear(d, 2 * e, False), nn.Linear(e, d, False)
        self.conv = nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1)
        self.x_proj, self.dt_proj = nn.Linear(e, self.r + 2 * n, False), nn.Linear(self.r, e)
        dt = torch.exp(torch.rand(e) * np.log(100) + np.log(1e-3))  # Δ in [1e-3, 0.1]
        self.dt_proj.bias.data = dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(Δ)
        self.A_log = nn.Parameter(torch.log(torch.arange(1.0, n + 1)).repeat(e, 1))  # S4D-real
        self.D = nn.Parameter(torch.ones(e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, time, d)
        u, z = self.in_proj(x).chunk(2, -1)
        u = F.silu(self.conv(u.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2))
        dt, b, c = self.x_proj(u).split([self.r, self.n, self.n], -1)  # Δ (low rank), B, C
        dt = F.softplus(self.dt_proj(dt))  # Δ: (batch, time, e)
        dt, dtu, b, c = (v.transpose(0, 1).contiguous() for v in (dt, dt * u, b, c))  # time-major
        a, bu = torch.exp(dt[..., None] * -torch.exp(self.A_log)), dtu[..., None] * b[:, :, None]
        h, ys = torch.zeros_like(bu[0]), []  # state (batch, e, n); T is short: a plain loop
        for a_t, bu_t, c_t in zip(a, bu, c, strict=True):
            h = a_t * h + bu_t  # h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t
            ys.append((h @ c_t[..., None]).squeeze(-1))  # y_t = C_t h_t
        return self.out_proj((torch.stack(ys, 1) + self.D * u) * F.silu(z))


class SeqModel(nn.Module):  # embedding → pre-norm residual Mamba blocks (or an LSTM) → head
    def __init__(self, cfg: SsmSelectiveCopyConfig, splits: Splits, lstm_hidden: int = 0):
        super().__init__()
        d, w, k = cfg.d_model, lstm_hidden or cfg.d_model, FIRST + cfg.vocab
        self.embed, self.drop = nn.Embedding(k, d), nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(d, w, batch_first=True) if lstm_hidden else None
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(0 if self.lstm else cfg.n_layer))
        self.layers = nn.ModuleList(Mamba(d, cfg.d_state) for _ in self.norms)
        self.head = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, time) ids → logits
        h = self.embed(x) if self.lstm is None else self.lstm(self.embed(x))[0]
        for norm, layer in zip(self.norms, self.layers, strict=True):
            h = h + self.drop(layer(norm(h)))
        return self.head(h)


def eval_step(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    x, y = batch  # only the marker positions are scored; per-sequence means (same count each)
    logits = model(x)[:, -y.shape[1] :].float()
    right = (logits.argmax(-1) == y).float()
    loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
    return {"loss": loss, "acc": right.mean(1), "seq_acc": right.min(1).values}


def position_accuracy(model: nn.Module, data: TensorDataset, device) -> np.ndarray:
    x, y = data[:]
    logits = torch.cat([model(xb.to(device)).cpu() for xb in x.split(128)])
    return (logits[:, -y.shape[1] :].argmax(-1) == y).float().mean(0).numpy()


def references(cfg: SsmSelectiveCopyConfig, splits: Splits) -> dict[str, float]:
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.random.fork_rng():  # the training loop's random state is left alone
        torch.manual_seed(cfg.split_seed)
        target = size(SeqModel(cfg, splits))  # one-layer LSTM, width matching the SSM's size:
        hidden = min(range(8, 512, 4), key=lambda h: abs(size(SeqModel(cfg, splits, h)) - target))
        model = SeqModel(cfg, splits, hidden)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(cfg.lstm_epochs):
            for batch in DataLoader(splits.train, batch_size=64, shuffle=True):
                opt.zero_grad()
                eval_step(model, batch)["loss"].mean().backward()
                opt.step()
        with torch.no_grad():
            acc = position_accuracy(model.eval(), splits.val, torch.device("cpu")).mean()
    return {"lstm_acc": float(acc), "lstm_params": float(size(model)), "ssm_params": float(target)}


def position_report(end: EpochEnd) -> dict[str, float]:
    if end.is_last:  # held-out accuracy at each output position
        acc, fig = position_accuracy(end.model, end.splits.val, end.device), Figure((6, 3.5))
        ax = fig.add_subplot(xlabel="output position", ylabel="held-out accuracy", ylim=(0, 1.02))
        ax.bar(np.arange(1, len(acc) + 1), acc)
        end.log_image("position_accuracy", fig)
    return {}


JOB = JobSpec(
    config=SsmSelectiveCopyConfig,
    build_data=build_data,
    build_model=SeqModel,
    training_step=lambda model, batch: eval_step(model, batch)["loss"].mean(),
    eval_step=eval_step,
    main_metric="val/acc",
    mode="max",
    evaluate=position_report,
    references=references,
)
