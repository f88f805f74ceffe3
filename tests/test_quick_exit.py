"""quick_exit: a finished command ends without the interpreter's teardown, and loses nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

# A command that leaves work for the exit: an unflushed print (stdout is a pipe, so
# block-buffered), a non-daemon thread still writing, an idle thread pool (its threads end only
# when the exit tells them to), an atexit handler, and a module-level object whose finalizer
# only the interpreter's teardown runs.
COMMAND = textwrap.dedent(
    """
    import atexit, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor

    class TornDown:
        def __del__(self):
            sys.stdout.write("teardown ran\\n")

    kept = TornDown()

    def late_writer():
        time.sleep(0.3)
        sys.stdout.write("thread finished\\n")

    def main():
        # As MLflow and Ray register theirs: when the command imports them.
        atexit.register(lambda: sys.stdout.write("atexit ran\\n"))
        threading.Thread(target=late_writer).start()
        ThreadPoolExecutor(2).submit(print, "result", end=" ").result()
        if sys.argv[1] == "quick-raises":
            raise RuntimeError("boom")
        return 3

    if sys.argv[1].startswith("quick"):
        from orchestrator import quick_exit
        quick_exit.run(main)
    sys.exit(main())
    """
)


def run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", COMMAND, mode], capture_output=True, text=True, timeout=60
    )


def test_quick_exit_keeps_what_a_normal_exit_does_but_the_teardown():
    normal, quick = run("normal"), run("quick")
    assert normal.returncode == quick.returncode == 3
    for out in (normal, quick):
        assert out.stdout.startswith("result thread finished\natexit ran\n"), out.stdout
    assert "teardown ran" in normal.stdout  # the control: this finalizer runs at a normal exit
    assert "teardown ran" not in quick.stdout, quick.stdout
    assert quick.stderr == ""


def test_a_command_that_raises_exits_as_python_would():
    out = run("quick-raises")
    assert out.returncode == 1
    assert out.stderr.rstrip().endswith("RuntimeError: boom"), out.stderr
    assert "teardown ran" in out.stdout  # the usual exit, teardown included


def test_every_installed_command_ends_through_quick_exit():
    # quick_exit ends the process in the first atexit handler registered: one registered
    # before it would be skipped. The entry points' module registers none on import, and
    # imports the command's module only after registering its own.
    check = "import atexit; import orchestrator.quick_exit; print(atexit._ncallbacks())"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert out.stdout.strip() == "0", (out.stdout, out.stderr)

    commands = {
        e.name: e.value for e in entry_points(group="console_scripts") if e.name.startswith("orch")
    }
    assert commands == {
        "orchestrate": "orchestrator.quick_exit:orchestrate",
        "orchestrate-predict": "orchestrator.quick_exit:orchestrate_predict",
        "orchestrate-jobs": "orchestrator.quick_exit:orchestrate_jobs",
    }
