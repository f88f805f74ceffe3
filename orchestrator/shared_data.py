"""A run's data, built once beside the driver instead of once in every worker.

Each worker used to call `job.build_data` (and rank 0 `job.references`) itself, after the
worker group was up: every worker paid the job's imports (cnn_digits: scikit-learn, ~2 s) and
its processing, side by side on the same cores, on the way to the first step. `launch.fit`
now starts a `_DataBuilder` actor as it hands the job to Ray Train. It builds the splits while
Ray Train is still starting its controller and workers (~13 s on 2 cores), then, in the same
process, the job's reference scores; the workers fetch both from the object store. Jobs are
unchanged: the same `build_data` and `references`, in another process.

One process for both, not a task each: the references need the data's imports too (torch to
read the splits, the job module, scikit-learn), and a second process paid them again, ~3 s of
CPU that on 2 cores fell on the workers' first epochs (benchmarks/NOTES.md). The splits are
returned as soon as they are built; the references follow; then the actor ends (its results
stay in the object store, owned by the driver).

The actor takes 0 CPUs: on a small cluster the workers' placement group needs every CPU, and
an actor holding one would delay the very start-up it is meant to hide behind. For the same
reason it runs at a lower CPU priority (nice 10 more), so it uses the idle moments of the
start-up rather than compete with it, in a process of its own that ends when it is done.
Reference scores only need to be logged, not waited for: rank 0 logs them when ready.

The driver keeps the refs to the end of the run: the final model is rebuilt and logged from the
same splits (`kept_splits`), instead of the driver importing the job's libraries and building
the data again after training (cnn_digits: ~1 s and scikit-learn in the driver).

A sweep whose trials all read the same `job` section and `seed` (the usual case: it varies
optimizer, schedule and trainer keys) starts the builder once, on its own driver, and every
trial's workers fetch the same objects: see `same_for_every_trial`.
"""

from __future__ import annotations

import os
from typing import Any

from orchestrator.job import Splits, job_config, load_job

# Background work: yield the CPU to the processes starting the workers (see above).
_NICENESS = 10
# The only parts of the config the builder is given (`start`): trials that differ in nothing
# under these build the same data.
_INPUTS = ("job", "seed")


class _DataBuilder:
    """Builds a run's splits, then its reference scores, in one process (made an actor by
    `start`: this module is imported before Ray is)."""

    def __init__(self) -> None:
        os.nice(_NICENESS)

    def build_data(self, job_section: dict[str, Any], seed: int) -> Splits:
        from orchestrator.loop import seed_everything

        job = load_job(job_section["name"])
        seed_everything(seed, 0, 0)  # as the worker seeded before it built the data itself
        return job.build_data(job_config(job, job_section))

    def references(self, job_section: dict[str, Any], splits: Splits) -> dict[str, float]:
        job = load_job(job_section["name"])
        assert job.references is not None  # start() only asks for them when the job has some
        return job.references(job_config(job, job_section), splits)


def same_for_every_trial(swept_keys: list[str]) -> bool:
    """Whether trials that differ only in `swept_keys` build the same data and references."""
    return not any(key.split(".")[0] in _INPUTS for key in swept_keys)


def start(cfg: dict[str, Any]) -> dict[str, Any]:
    """Start building the run's splits (and reference scores, if the job has any); returns
    their object refs by name, for the workers' `fetch`."""
    import ray

    # A crashed process is replaced and its unfinished calls run again, as Ray retries a task.
    builder: Any = ray.remote(num_cpus=0, max_restarts=2, max_task_retries=2)(_DataBuilder).remote()
    job_section, seed = (cfg[key] for key in _INPUTS)
    refs: dict[str, Any] = {"splits": builder.build_data.remote(job_section, seed)}
    if load_job(job_section["name"]).references is not None:
        # The splits ref as an argument, not state kept in the actor: a replaced process
        # gets them too.
        refs["references"] = builder.references.remote(job_section, refs["splits"])
    # Ends the process once the calls above are done (not retried: its exit is no failure).
    builder.__ray_terminate__.options(max_task_retries=0).remote()
    return refs


def ready(refs: dict[str, Any], name: str) -> bool:
    """Whether the builder's result `name` can be fetched without waiting."""
    import ray

    done, _ = ray.wait([refs[name]], timeout=0)
    return bool(done)


def fetch(refs: dict[str, Any], name: str) -> Any:
    """The result `name` of the builder `start` started; a job's own error (a bad job.* value
    that build_data rejects) is raised as itself, as if this worker had built the data, with
    the builder's traceback (where in build_data it failed) chained before it."""
    import ray

    try:
        return ray.get(refs[name])
    except ray.exceptions.RayTaskError as exc:
        raise exc.cause from exc


def kept_splits(refs: dict[str, Any] | None) -> Splits | None:
    """The splits the builder made, for the driver once training is over; None when there are
    none to fetch (no builder, or the object is gone with its node): the caller builds them."""
    if refs is None:
        return None
    import ray

    try:
        return ray.get(refs["splits"])
    except ray.exceptions.RayError:  # lost, or never built: training would have failed first
        return None
