"""Ctrl-C and SIGTERM for the drivers: raised at once, except inside their own MLflow writes.

Both drivers (runner.py for a job, sweep.py for a sweep) turn SIGINT/SIGTERM into an exception
that ends the run KILLED. Raised in the middle of an MLflow call on SQLite, that exception cut
a transaction short and left the database locked to this very process: the driver's next write
(marking the run KILLED) then failed with "database is locked" — exit 1 and the run left
RUNNING (seen once, in the interrupted-sweep test). So the drivers wrap their MLflow writes
during training in `shielded()`; a signal that arrives there is raised as the section ends.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class DeferredInterrupts:
    """A signal handler that raises `to_exception(signum)` at once outside a shielded section
    and at the section's end inside one."""

    def __init__(self, to_exception: Callable[[int], BaseException]) -> None:
        self.to_exception = to_exception
        self.depth = 0  # how many shielded sections are open
        self.pending: int | None = None  # the signal that arrived inside one

    def handler(self, signum, frame) -> None:
        if self.depth:
            self.pending = signum
            return
        raise self.to_exception(signum)

    def install(self) -> dict[int, Any]:
        """Handle SIGINT and SIGTERM; returns the handlers to give to `restore`."""
        return {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self, previous: dict[int, Any]) -> None:
        """Put the previous handlers back where this one is still set (a cleanup may have set
        SIG_IGN meanwhile; that stays)."""
        for signum, handler in previous.items():
            # `==`: each `self.handler` is a new bound method, never `is` the one installed.
            if signal.getsignal(signum) == self.handler:
                signal.signal(signum, handler)

    @contextmanager
    def shielded(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                raise self.to_exception(signum)
