"""The job interface: what one file in `jobs/` provides to the shared training loop.

A job module defines a config dataclass (subclass of `JobConfig`) and a module-level
`JOB = JobSpec(...)`. The orchestrator finds it by name (`job=cnn_digits` imports
`jobs.cnn_digits`); it never imports `jobs` statically, so jobs depend on the orchestrator
and not the other way round (a test enforces this).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from orchestrator.config import JobConfig

# Package the orchestrator looks in for `job=<name>`. An environment variable rather than a
# config key because it must be known before the config can be composed.
JOBS_PACKAGE = os.environ.get("ORCHESTRATOR_JOBS_PACKAGE", "jobs")

Batch = Any  # whatever the job's Dataset yields, collated by the default DataLoader collate


@dataclass
class Splits:
    """A job's data: training and fixed held-out split, plus facts the model needs."""

    train: Dataset
    val: Dataset
    info: dict[str, Any] = field(default_factory=dict)


class ArtifactSink(Protocol):
    def log_image(self, name: str, image: Any, epoch: int) -> None: ...

    def log_text(self, name: str, text: str, epoch: int) -> None: ...


@dataclass
class EpochEnd:
    """What a job's `evaluate` hook sees on rank 0 after each epoch's held-out evaluation.

    `model` is the unwrapped model in eval mode; the hook only observes it. Images
    (numpy HxW / HxWx3 uint8 arrays, PIL images or matplotlib figures) and text go to the
    MLflow run as `<name>/epoch_<NNN>.png|txt`.
    """

    model: nn.Module
    splits: Splits
    config: Any
    epoch: int
    max_epochs: int
    device: torch.device
    artifacts: ArtifactSink

    @property
    def is_last(self) -> bool:
        return self.epoch == self.max_epochs

    def log_image(self, name: str, image: Any) -> None:
        self.artifacts.log_image(name, image, self.epoch)

    def log_text(self, name: str, text: str) -> None:
        self.artifacts.log_text(name, text, self.epoch)


@dataclass(frozen=True)
class JobSpec:
    config: type[JobConfig]
    build_data: Callable[[Any], Splits]
    build_model: Callable[[Any, Splits], nn.Module]
    # Mean loss of one training batch (augmentation, if any, happens here).
    training_step: Callable[[nn.Module, Batch], torch.Tensor]
    # Per-sample values of a held-out batch, e.g. {"loss": ..., "acc": ...}; the loop sums them
    # over every worker's shard and logs the means as val/<key>.
    eval_step: Callable[[nn.Module, Batch], dict[str, torch.Tensor]]
    main_metric: str  # e.g. "val/acc"
    mode: str = "max"  # whether larger main_metric is better
    # The model's input tensor from a batch, used for the logged model's signature.
    model_input: Callable[[Batch], torch.Tensor] = lambda batch: batch[0]
    # Optional hooks. `evaluate` runs on rank 0 after the sharded evaluation, for metrics that
    # don't decompose per sample (FID, AUROC, ...) and for plots; it returns extra metrics.
    evaluate: Callable[[EpochEnd], dict[str, float]] | None = None
    # Reference baselines on the same split (e.g. an SVM's accuracy), computed once on rank 0
    # and logged at step 0 so the MLflow UI shows them beside the job's main metric.
    references: Callable[[Any, Splits], dict[str, float]] | None = None
    # What to log as the MLflow model when the trained module is not what one deploys (a
    # GAN's generator): (module, example input) from the trained model and a held-out batch.
    export: Callable[[nn.Module, Batch], tuple[nn.Module, torch.Tensor]] | None = None
    # Keys of the job's config that name a model to start from (`init_from`): checked on the
    # driver before anything starts, so a missing model is an input error, not a failed run.
    model_sources: tuple[str, ...] = ()


def load_job(name: str) -> JobSpec:
    module = importlib.import_module(f"{JOBS_PACKAGE}.{name}")
    spec = getattr(module, "JOB", None)
    if not isinstance(spec, JobSpec):
        raise TypeError(f"{module.__name__} must define JOB = JobSpec(...)")
    return spec


def job_config(spec: JobSpec, values: dict[str, Any]) -> Any:
    """The job's typed config from the plain dict the workers receive."""
    return spec.config(**values)


# --- Steps shared by classification jobs ---------------------------------------------------


def classification_eval_step(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    x, y = batch
    logits = model(x)
    return {
        "loss": nn.functional.cross_entropy(logits.float(), y, reduction="none"),
        "acc": (logits.argmax(dim=1) == y).float(),
    }
