"""Errors the user can fix. The CLI prints each as one line and exits with its code.

A `UserError` is raised for bad configs, bad overrides and unreachable services: things that
must stop the command *before* anything starts (no Ray, no MLflow run). Everything else is a
bug or a training failure and is reported differently.
"""

from __future__ import annotations

EXIT_USAGE = 2  # bad input: same code argparse and Hydra's CLI conventions use


class UserError(Exception):
    """A problem with what the user asked for. `key` names the config key or file at fault."""

    exit_code = EXIT_USAGE

    def __init__(self, key: str, problem: str, fix: str = ""):
        self.key = key
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        line = f"{self.key}: {self.problem}" if self.key else self.problem
        return f"{line} — {self.fix}" if self.fix else line


class TrainingFailed(Exception):
    """Training ran but did not succeed (non-finite loss, worker errors past max_failures)."""
