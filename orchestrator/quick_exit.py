"""Leave a finished command without the interpreter's teardown.

A command that has imported torch, MLflow and Ray holds millions of Python objects. When it
returns, the interpreter's finalization walks all of them (the cyclic garbage collector, as
every module is cleared) before the process ends: 1.7-2.1 s measured here after the last line
was printed, on every `orchestrate` run, for nothing the command still needed.

Everything else a normal exit does still happens, through the normal exit itself: non-daemon
threads are joined (thread pools told to stop first), every `atexit` handler runs (MLflow's,
Ray's, `weakref.finalize`). The process ends in one more `atexit` handler, registered before
the command runs, so it runs after all the others (they run last-registered first): it shuts
`logging` down (the one handler a command module may register earlier, by importing e.g.
asyncio), flushes standard output and error, then `os._exit`s. An exception escaping the
command takes the interpreter's usual path, teardown included.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from typing import NoReturn


def run(main: Callable[[], int]) -> NoReturn:
    """Run a console command's `main` and end the process with its exit code."""
    code: list[int] = []

    def end_process() -> None:
        if not code:  # `main` raised: the interpreter reports it and tears down as usual
            return
        if "logging" in sys.modules:
            import logging

            logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can reach the reader
                pass
        os._exit(code[0])

    atexit.register(end_process)  # first registered: runs after every handler added later
    code.append(main())
    sys.exit(code[0])
