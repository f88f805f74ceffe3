"""Ray Train's worker actor, importing ahead what the first training step needs.

Every torch optimizer imports `torch._dynamo` the first time it adds its parameters (torch
wraps `add_param_group` in `torch._disable_dynamo`, which imports dynamo on first call): ~2 s
on this machine's CPUs (sympy, mpmath and ~800 modules), spent in the training function after
the model is built, on the path to the first step. The worker actor starts long before that:
Ray Train then creates the train context, starts the process group and hands over the training
function, and the worker mostly waits on the controller meanwhile. This actor imports torch and
`torch._dynamo` in a thread from the moment it is created, so that wait pays for them.

Used on clusters the driver joins (orchestrator/trainers.py). Measured on 2 CPUs, B2's short
job, alternated pairs: on a running head, fit → first step 16.6 → 15.1 s (5 pairs, each
faster); right after an embedded Ray start, no faster (14.8 → 15.2 s, 9 pairs): the import
then only moves into the worker group's start, which it slows by as much.

Kept apart from trainers.py, which imports torch: this module is what a worker process loads to
create the actor, and the import must start in the thread, not before the actor exists.
"""

from __future__ import annotations

import importlib
import threading

from ray.train.v2._internal.execution.worker_group.worker import RayTrainWorker

IMPORTED_AHEAD = "torch._dynamo"  # torch itself comes first, as its parent package


def _import_ahead() -> None:
    try:
        importlib.import_module(IMPORTED_AHEAD)
    except Exception:
        pass  # left to the training function's own import, which reports it


class WorkerImportingAhead(RayTrainWorker):
    """RayTrainWorker (private Ray API, 2.60), importing IMPORTED_AHEAD in a thread as it
    starts. A later import of the same module in the training thread waits for this one
    (Python's per-module import lock) instead of importing it twice."""

    def __init__(self) -> None:
        super().__init__()
        threading.Thread(target=_import_ahead, name="import-ahead", daemon=True).start()
