"""The driver's head starts on imports: modules loaded in a thread while it waits on Ray."""

from __future__ import annotations

import subprocess
import sys
import textwrap

WARM_UP = textwrap.dedent(
    """
    import sys, threading
    import torch.export
    from orchestrator import tracking

    # What `torch.export.export` imports on its first call (MLflow saves models with it).
    assert "torch.export._trace" not in sys.modules
    tracking.import_model_logging_in_background()
    tracking._import_in_thread(["no_such_module_here"], "import-missing")
    for thread in threading.enumerate():
        if thread.name.startswith("import-"):
            thread.join()
    print(sorted(m for m in ("torch.export._trace", "mlflow.pytorch") if m in sys.modules))
    """
)


def test_model_logging_is_imported_ahead_and_a_missing_module_is_no_error():
    out = subprocess.run(
        [sys.executable, "-c", WARM_UP], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['mlflow.pytorch', 'torch.export._trace']"
    assert "no_such_module_here" not in out.stderr  # no traceback from the warm-up thread
