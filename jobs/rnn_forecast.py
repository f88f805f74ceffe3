"""RNN / LSTM / GRU one-step-ahead forecasting of statsmodels' sunspots (yearly) or CO2 (weekly).

    orchestrate job=rnn_forecast job.cell=lstm job.hidden=64 job.window=30
    orchestrate job=rnn_forecast job.dataset=co2 job.window=52 job.max_ar_order=60

Held-out: the last 20 % of the series (chronological; held-out targets' windows may read earlier
values). The model maps raw values to the next raw value, scaled inside by training-part stats.
Main metric: held-out RMSE in original units; references: naive last value, ridge AR(p).
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from orchestrator.config import JobConfig
from orchestrator.job import EpochEnd, JobSpec, Splits

HELD_OUT_FRACTION = 0.2
CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


@dataclass
class RnnForecastConfig(JobConfig):
    name: str = "rnn_forecast"
    dataset: str = "sunspots"  # sunspots | co2
    cell: str = "gru"  # rnn | lstm | gru
    window: int = 20  # previous values the model sees
    hidden: int = 32
    layers: int = 1
    dropout: float = 0.0  # on the last hidden state (and between stacked layers)
    residual: bool = True  # predict the change from the last value rather than the value
    max_ar_order: int = 24  # largest p the AR reference tries


def load_series(dataset: str) -> np.ndarray:
    from statsmodels import datasets  # not statsmodels.api: that imports all of statsmodels

    if dataset == "sunspots":
        return datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(float)
    if dataset == "co2":  # weekly, with gaps
        return datasets.co2.load_pandas().data["co2"].interpolate().to_numpy(float)
    raise ValueError(f"job.dataset must be sunspots or co2, got '{dataset}'")


def windows(series: np.ndarray, width: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs series[t - width:t] and targets series[t] for t in [max(start, width), end)."""
    ts = range(max(start, width), end)
    return np.stack([series[t - width : t] for t in ts]), series[ts.start : ts.stop]


def build_data(cfg: RnnForecastConfig) -> Splits:
    series = load_series(cfg.dataset)
    n_train = len(series) - round(HELD_OUT_FRACTION * len(series))
    part = series[:n_train]  # scaling statistics come from the training part only
    info = {"series": series, "n_train": n_train, "loc": part.mean(), "scale": part.std()}

    def ds(start: int, end: int) -> TensorDataset:
        x, y = windows(series, cfg.window, start, end)
        return TensorDataset(torch.tensor(x).float(), torch.tensor(y).float())

    return Splits(ds(0, n_train), ds(n_train, len(series)), info)


class Forecaster(nn.Module):  # window of raw values (N×W) → next raw value (N), scaled inside
    def __init__(self, cfg: RnnForecastConfig, loc: float, scale: float):
        super().__init__()
        if cfg.cell not in CELLS:
            raise ValueError(f"job.cell must be one of {', '.join(CELLS)}, got '{cfg.cell}'")
        self.register_buffer("loc", torch.tensor(float(loc)))
        self.register_buffer("scale", torch.tensor(float(scale)))
        between = cfg.dropout if cfg.layers > 1 else 0.0  # torch warns on 1 layer
        self.rnn = CELLS[cfg.cell](1, cfg.hidden, cfg.layers, batch_first=True, dropout=between)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden, 1)
        self.residual = cfg.residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.loc) / self.scale
        out, _ = self.rnn(z.unsqueeze(-1))
        step = self.head(self.drop(out[:, -1])).squeeze(-1)
        return (z[:, -1] + step if self.residual else step) * self.scale + self.loc


def training_step(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    scale = getattr(model, "module", model).scale  # loss in training-scaled units
    return F.mse_loss(model(x) / scale, y / scale)


def eval_step(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    x, y = batch
    se = (model(x).float() - y) ** 2  # per-sample squared error in original units
    return {"se": se, "loss": se / getattr(model, "module", model).scale ** 2}  # as train loss


def rmse(pred, y) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred) - np.asarray(y)) ** 2)))


def references(cfg: RnnForecastConfig, splits: Splits) -> dict[str, float]:
    from sklearn.linear_model import Ridge

    s, n_train, scale = splits.info["series"], splits.info["n_train"], splits.info["scale"]
    z = (s - splits.info["loc"]) / scale
    n_fit = n_train - round(HELD_OUT_FRACTION * n_train)  # validation slice: end of training

    def ar_rmse(p: int, fit_end: int, end: int) -> float:  # fit on [0, fit_end), score to end
        model = Ridge(alpha=1.0).fit(*windows(z, p, 0, fit_end))
        x, y = windows(z, p, fit_end, end)
        return rmse(model.predict(x) * scale, y * scale)

    p = min(range(1, cfg.max_ar_order + 1), key=lambda p: ar_rmse(p, n_fit, n_train))
    naive = rmse(s[n_train - 1 : -1], s[n_train:])
    return {"naive_rmse": naive, "ar_rmse": ar_rmse(p, n_train, len(s)), "ar_order": float(p)}


def report(end: EpochEnd) -> dict[str, float]:
    """RMSE on the whole held-out part; on the last epoch, the forecast-vs-actual plot."""
    x, y = end.splits.val[:]
    pred = end.model(x.to(end.device)).float().cpu().numpy()
    score = rmse(pred, y.numpy())
    if end.is_last:
        from matplotlib.figure import Figure  # no pyplot: workers have no display

        t = np.arange(len(end.splits.info["series"]))[-len(y) :]
        ax = (fig := Figure(figsize=(9, 3.5), layout="tight")).add_subplot()
        ax.plot(t, y.numpy(), "k-", t, pred, "C1-")
        ax.set(xlabel="time step", ylabel=end.config.dataset, title=f"held-out RMSE {score:.2f}")
        ax.legend(["actual", f"{end.config.cell} forecast"])
        end.log_image("forecast", fig)
    return {"val/rmse": score}


JOB = JobSpec(
    config=RnnForecastConfig,
    build_data=build_data,
    build_model=lambda cfg, splits: Forecaster(cfg, splits.info["loc"], splits.info["scale"]),
    training_step=training_step,
    eval_step=eval_step,
    main_metric="val/rmse",
    mode="min",
    evaluate=report,
    references=references,
)
