"""The architecture's rules, checked (DESIGN.md §4).

1. Imports go one way: `jobs/` imports `orchestrator/`, never the reverse.
2. A job is one small file: `JOB = JobSpec(...)`, its own `conf/job/<name>.yaml`, under 150 lines.

    pytest tests/test_architecture.py -q
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest
import yaml

from orchestrator.config import JobConfig
from orchestrator.job import JobSpec

PROJECT_DIR = Path(__file__).resolve().parent.parent
ORCHESTRATOR_DIR = PROJECT_DIR / "orchestrator"
JOBS_DIR = PROJECT_DIR / "jobs"
CONF_JOB_DIR = PROJECT_DIR / "conf" / "job"
MAX_JOB_LINES = 150

ORCHESTRATOR_FILES = sorted(ORCHESTRATOR_DIR.rglob("*.py"))
JOB_NAMES = sorted(p.stem for p in JOBS_DIR.glob("*.py") if p.stem != "__init__")


def imports_of_jobs(source: str, filename: str = "<string>") -> list[str]:
    """Every import statement in `source` that reaches the `jobs` package, as `line: text`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names = [node.module]
            elif node.level >= 2:  # `from ..jobs import x` inside orchestrator/ is the same thing
                names = [node.module or ""] + [alias.name for alias in node.names]
        if any(n == "jobs" or n.startswith("jobs.") for n in names):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize(
    "source",
    [
        "import jobs",
        "import jobs.cnn_digits",
        "import os, jobs.cnn_digits as j",
        "from jobs import cnn_digits",
        "from jobs.cnn_digits import JOB",
        "def f():\n    from jobs.mlp_tabular import JOB\n",
        "from .. import jobs",
        "from ..jobs.cnn_digits import JOB",
    ],
)
def test_checker_catches_imports_of_jobs(source):
    assert imports_of_jobs(source), source


@pytest.mark.parametrize(
    "source",
    [
        "import jobsite",
        "from jobsite import x",
        "from orchestrator.job import JobSpec",
        "from . import job",
        "import importlib; importlib.import_module('jobs.x')",  # by name at run time: allowed
    ],
)
def test_checker_allows_other_imports(source):
    assert imports_of_jobs(source) == [], source


def test_orchestrator_files_found():
    names = {p.name for p in ORCHESTRATOR_FILES}
    assert {"cli.py", "config.py", "loop.py", "job.py"} <= names


@pytest.mark.parametrize(
    "path", ORCHESTRATOR_FILES, ids=[str(p.relative_to(PROJECT_DIR)) for p in ORCHESTRATOR_FILES]
)
def test_orchestrator_never_imports_jobs(path):
    found = imports_of_jobs(path.read_text(), str(path))
    assert found == [], f"{path.relative_to(PROJECT_DIR)} imports jobs/: {found}"


# --- one small file per job ------------------------------------------------------------------


def test_jobs_found():
    assert JOB_NAMES, "no jobs/*.py"


@pytest.mark.parametrize("name", JOB_NAMES)
def test_job_is_one_small_file(name):
    lines = len((JOBS_DIR / f"{name}.py").read_text().splitlines())
    assert lines < MAX_JOB_LINES, f"jobs/{name}.py has {lines} lines; keep a job under 150"


@pytest.mark.parametrize("name", JOB_NAMES)
def test_job_defines_a_jobspec(name):
    module = importlib.import_module(f"jobs.{name}")
    spec = getattr(module, "JOB", None)
    assert isinstance(spec, JobSpec), f"jobs/{name}.py must define JOB = JobSpec(...)"
    assert dataclasses.is_dataclass(spec.config) and issubclass(spec.config, JobConfig)
    assert spec.config().name == name, f"{spec.config.__name__}.name must default to '{name}'"
    assert spec.mode in ("min", "max")
    assert spec.main_metric.startswith("val/")


@pytest.mark.parametrize("name", JOB_NAMES)
def test_job_has_its_config(name):
    path = CONF_JOB_DIR / f"{name}.yaml"
    assert path.is_file(), f"jobs/{name}.py has no conf/job/{name}.yaml"
    text = path.read_text()
    assert text.startswith("# @package _global_"), f"{path.name} must start with @package"
    values = yaml.safe_load(text)
    assert f"/schema/job/{name}@job" in values["defaults"], f"{path.name} must use its schema"
    assert values["job"]["name"] == name


def test_every_job_config_has_a_job_file():
    orphans = sorted({p.stem for p in CONF_JOB_DIR.glob("*.yaml")} - set(JOB_NAMES))
    assert orphans == [], f"conf/job/ options without jobs/<name>.py: {orphans}"
