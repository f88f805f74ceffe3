"""A run's data, built once by Ray tasks beside the driver instead of once in every worker.

Each worker used to call `job.build_data` (and rank 0 `job.references`) itself, after the
worker group was up: every worker paid the job's imports (cnn_digits: scikit-learn, ~2 s) and
its processing, side by side on the same cores, on the way to the first step. `launch.fit`
now starts two tasks as it hands the job to Ray Train. They run while Ray Train is still
starting its controller and workers (~13 s on 2 cores), and the workers then fetch the
results from the object store. Jobs are unchanged: the same `build_data`, in another process.

The tasks take 0 CPUs: on a small cluster the workers' placement group needs every CPU,
and a task holding one would delay the very start-up it is meant to hide behind. For the same
reason they run at a lower CPU priority (nice 10), so they use the idle moments of the
start-up rather than compete with it, each in a process of its own that exits afterwards
(`max_calls=1`: the lowered priority and the imports go with it, not into Ray's worker pool).
Reference scores only need to be logged, not waited for: rank 0 logs them when ready.

A sweep whose trials all read the same `job` section and `seed` (the usual case: it varies
optimizer, schedule and trainer keys) starts the tasks once, on its own driver, and every
trial's workers fetch the same objects: see `same_for_every_trial`.
"""

from __future__ import annotations

import os
from typing import Any

from orchestrator.job import Splits, job_config, load_job

# Background work: yield the CPU to the processes starting the workers (see above).
_NICENESS = 10
# The only parts of the config the tasks are given (`start`): trials that differ in nothing
# under these build the same data.
_INPUTS = ("job", "seed")


def _build_data(job_section: dict[str, Any], seed: int) -> Splits:
    from orchestrator.loop import seed_everything

    os.nice(_NICENESS)
    job = load_job(job_section["name"])
    seed_everything(seed, 0, 0)  # as the worker seeded before it built the data itself
    return job.build_data(job_config(job, job_section))


def _references(job_section: dict[str, Any], splits: Splits) -> dict[str, float]:
    os.nice(_NICENESS)
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

    in_background = ray.remote(num_cpus=0, max_calls=1)
    job_section, seed = (cfg[key] for key in _INPUTS)
    refs: dict[str, Any] = {"splits": in_background(_build_data).remote(job_section, seed)}
    if load_job(job_section["name"]).references is not None:
        # The splits ref as an argument: Ray hands the task the built splits, not a copy of
        # the work.
        refs["references"] = in_background(_references).remote(job_section, refs["splits"])
    return refs


def ready(refs: dict[str, Any], name: str) -> bool:
    """Whether the task's result `name` can be fetched without waiting."""
    import ray

    done, _ = ray.wait([refs[name]], timeout=0)
    return bool(done)


def fetch(refs: dict[str, Any], name: str) -> Any:
    """The result `name` of a task `start` started; a job's own error (a bad job.* value
    that build_data rejects) is raised as itself, as if this worker had built the data, with
    the task's traceback (where in build_data it failed) chained before it."""
    import ray

    try:
        return ray.get(refs[name])
    except ray.exceptions.RayTaskError as exc:
        raise exc.cause from exc
