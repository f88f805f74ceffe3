"""Every config composes and validates; bad values are rejected naming their key.

Fast, in-process: Hydra's compose API and the schema, no Ray, no MLflow.

    pytest tests/test_config.py -q
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import config as schema
from orchestrator.cli import CONF_DIR, compose_config
from orchestrator.config import validate
from orchestrator.errors import UserError
from orchestrator.loop import lr_factor

PROJECT_DIR = Path(__file__).resolve().parent.parent


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def group_overrides() -> list[pytest.param]:
    """One override per option of every group under conf/, found by globbing."""
    params = [
        pytest.param(group, name, [f"{group}={name}"], id=f"{group}={name}")
        for group in ("job", "optim", "sched")
        for name in options(group)
    ]
    params += [
        pytest.param("experiment", name, [f"+experiment={name}"], id=f"+experiment={name}")
        for name in options("experiment")
    ]
    return params


def assert_plain(value: Any, where: str = "cfg") -> None:
    """Only what a Ray worker can receive as-is: dicts, lists and scalars, no OmegaConf."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{where}: non-string key {key!r}"
            assert_plain(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_plain(item, f"{where}[{i}]")
    else:
        assert value is None or type(value) in (str, int, float, bool), (
            f"{where} is a {type(value).__name__}"
        )


@pytest.fixture(scope="module")
def valid_cfg() -> dict[str, Any]:
    return compose_config([])


# --- every config composes --------------------------------------------------------------


def test_groups_have_options():
    assert options("job"), "no conf/job/*.yaml"
    assert options("optim") and options("sched")


@pytest.mark.parametrize(("group", "name", "overrides"), group_overrides())
def test_every_option_composes_and_validates(group, name, overrides):
    cfg = compose_config(overrides)
    assert_plain(cfg)
    validate(cfg)  # compose_config validated already; it must stay valid
    if group == "job":
        assert cfg["job"]["name"] == name
    elif group in ("optim", "sched"):
        chosen = yaml.safe_load((CONF_DIR / group / f"{name}.yaml").read_text()) or {}
        # The job's YAML comes later in the defaults list and may retune some of these.
        job_yaml = yaml.safe_load((CONF_DIR / "job" / f"{cfg['job']['name']}.yaml").read_text())
        for key, value in chosen.items():
            if key not in (job_yaml.get(group) or {}):
                assert cfg[group][key] == value, f"{group}={name} did not set {group}.{key}"


@pytest.mark.parametrize("job", options("job"))
@pytest.mark.parametrize("optim", options("optim"))
@pytest.mark.parametrize("sched", options("sched"))
def test_every_combination_composes(job, optim, sched):
    cfg = compose_config([f"job={job}", f"optim={optim}", f"sched={sched}"])
    assert (cfg["job"]["name"], cfg["optim"]["name"], cfg["sched"]["name"]) == (job, optim, sched)


def test_default_job_is_the_one_in_config_yaml():
    defaults = yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"]
    default_job = next(e["job"] for e in defaults if isinstance(e, dict) and "job" in e)
    assert compose_config([])["job"]["name"] == default_job


# --- what compose_config returns ---------------------------------------------------------


def test_compose_returns_plain_dict_with_schema_defaults(valid_cfg):
    cfg = valid_cfg
    assert type(cfg) is dict
    assert_plain(cfg)
    assert set(cfg) == {f.name for f in dataclasses.fields(schema.Config)}
    # Groups no YAML touches carry exactly the schema's defaults...
    assert cfg["cluster"] == dataclasses.asdict(schema.ClusterConfig())
    assert cfg["tracking"] == dataclasses.asdict(schema.TrackingConfig())
    assert cfg["sweep"] == dataclasses.asdict(schema.SweepConfig())
    assert cfg["seed"] == 0
    # ...and nothing is made absolute at compose time: that is the runner's job, on the driver.
    assert cfg["tracking"]["uri"] == "sqlite:///mlflow.db"
    assert cfg["cluster"]["storage_path"] is None
    assert cfg["cluster"]["address"] is None
    # Trainer keys the job YAML does not set keep the schema's defaults.
    job_yaml = yaml.safe_load((CONF_DIR / "job" / f"{cfg['job']['name']}.yaml").read_text())
    set_by_job = set(job_yaml.get("trainer", {}))
    for key, default in dataclasses.asdict(schema.TrainerConfig()).items():
        if key not in set_by_job:
            assert cfg["trainer"][key] == default, f"trainer.{key}"


def test_job_yaml_values_win_over_schema_and_group_presets():
    cfg = compose_config(["job=mlp_tabular"])
    assert cfg["trainer"]["max_epochs"] == 80
    assert cfg["trainer"]["batch_size"] == 16
    assert cfg["optim"]["lr"] == pytest.approx(3e-3)  # over optim/adamw.yaml's 1e-3
    assert cfg["job"]["hidden"] == [16]


def test_command_line_wins_over_job_yaml():
    cfg = compose_config(
        ["job=mlp_tabular", "trainer.max_epochs=3", "optim.lr=0.5", "job.hidden=[8,4]"]
    )
    assert cfg["trainer"]["max_epochs"] == 3
    assert cfg["optim"]["lr"] == pytest.approx(0.5)
    assert cfg["job"]["hidden"] == [8, 4]


def test_compose_does_not_leak_between_calls():
    first = compose_config(["job=mlp_tabular", "trainer.max_epochs=3"])
    second = compose_config(["job=mlp_tabular"])
    assert (first["trainer"]["max_epochs"], second["trainer"]["max_epochs"]) == (3, 80)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["trainer.foo=1"], "trainer.foo"),
        (["+trainer.foo=1"], "trainer.foo"),
        (["+foo=1"], "foo"),
        (["job.foo=1"], "job.foo"),
        (["+job.foo=1"], "job.foo"),
        (["trainer.batch_size=abc"], "trainer.batch_size"),
        (["job=cnn_digits", "job.channels=abc"], "job.channels"),
        (["seed=[1"], "seed=[1"),
        (["job=cnn_digits", "job.dropout=abc"], "job.dropout"),
        (["job=nope"], "job"),
        (["optim=nope"], "optim"),
        (["sched=nope"], "sched"),
        (["+experiment=nope"], "experiment"),
        (["job=cnn_digits", "job.name=mlp_tabular"], "job.name"),
        (["optim.lr=0"], "optim.lr"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_compose_rejects_with_key(overrides, key):
    with pytest.raises(UserError) as info:
        compose_config(overrides)
    assert info.value.key == key
    assert info.value.fix, "every error says how to fix it"
    assert "\n" not in info.value.one_line()


def test_experiment_can_choose_its_job(tmp_path):
    """An experiment that picks its job (`override /job: x`) composes with that job's schema.

    Runs on a copy of the project with one extra experiment, so conf/ itself stays untouched.
    """
    for part in ("orchestrator", "jobs", "conf"):
        shutil.copytree(
            PROJECT_DIR / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__")
        )
    (tmp_path / "conf" / "experiment").mkdir(exist_ok=True)  # git keeps no empty folder
    (tmp_path / "conf" / "experiment" / "tab_sgd.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n"
        "  - override /job: mlp_tabular\n"
        "  - override /optim: sgd\n"
        "trainer:\n"
        "  max_epochs: 5\n"
    )
    code = textwrap.dedent(
        """
        import json, sys
        from orchestrator.cli import CONF_DIR, compose_config
        assert str(CONF_DIR).startswith(sys.argv[1]), CONF_DIR
        for o in (["+experiment=tab_sgd"], ["+experiment=tab_sgd", "trainer.max_epochs=2"]):
            c = compose_config(o)
            print(json.dumps([c["job"]["name"], c["optim"]["name"], c["trainer"]["max_epochs"]]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ['["mlp_tabular", "sgd", 5]', '["mlp_tabular", "sgd", 2]']


# --- validate() rejects each bad value, naming its key -----------------------------------

BAD_VALUES = [
    ("trainer.num_workers", 0),
    ("trainer.num_workers", -2),
    ("trainer.max_epochs", 0),
    ("trainer.batch_size", 0),
    ("trainer.grad_accum_steps", 0),
    ("trainer.max_failures", -1),
    ("trainer.cpus_per_worker", 0.0),
    ("trainer.grad_clip", -0.5),
    ("trainer.log_every_n_steps", 0),
    ("trainer.threads_per_worker", -1),
    ("trainer.precision", "fp8"),
    ("trainer.precision", "fp16"),
    ("trainer.placement_strategy", "spread"),  # Ray's names are upper case
    ("trainer.placement_strategy", "ROUND_ROBIN"),
    ("optim.name", "rmsprop"),
    ("optim.lr", 0.0),
    ("optim.lr", -1e-3),
    ("optim.weight_decay", -0.1),
    ("optim.momentum", 1.0),
    ("optim.momentum", -0.1),
    ("optim.betas", [0.9]),
    ("optim.betas", [0.9, 1.0]),
    ("sched.name", "step"),
    ("sched.warmup_epochs", -1.0),
    ("sched.warmup_epochs", 1e6),  # longer than training
    ("sched.min_lr_ratio", 1.5),
    ("sched.min_lr_ratio", -0.1),
    ("cluster.num_cpus", 0),
    ("tracking.experiment", "  "),
    ("tracking.alias", ""),
]


def with_value(cfg: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    bad = copy.deepcopy(cfg)
    section, key = dotted.split(".")
    bad[section][key] = value
    return bad


def test_valid_config_passes(valid_cfg):
    validate(copy.deepcopy(valid_cfg))


@pytest.mark.parametrize(("key", "value"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_validate_rejects_bad_value_naming_key(valid_cfg, key, value):
    with pytest.raises(UserError) as info:
        validate(with_value(valid_cfg, key, value))
    err = info.value
    assert err.key == key
    assert err.exit_code == 2
    assert err.fix, f"{key}: the message must say how to fix it"
    line = err.one_line()
    assert line.startswith(f"{key}: ") and "\n" not in line


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("trainer.grad_clip", 0.0),  # 0 = off
        ("trainer.threads_per_worker", 0),  # 0 = auto
        ("trainer.max_failures", 0),
        ("trainer.precision", "bf16"),
        ("optim.name", "sgd"),
        ("optim.momentum", 0.0),
        ("sched.name", "constant"),
        ("sched.warmup_epochs", 0.0),
        ("sched.min_lr_ratio", 1.0),
        ("cluster.num_cpus", 1),
    ],
    ids=lambda v: str(v),
)
def test_validate_accepts_boundary_values(valid_cfg, key, value):
    validate(with_value(valid_cfg, key, value))


def test_warmup_may_last_all_of_training(valid_cfg):
    cfg = copy.deepcopy(valid_cfg)
    cfg["sched"]["warmup_epochs"] = float(cfg["trainer"]["max_epochs"])
    validate(cfg)


# --- the learning-rate schedule ------------------------------------------------------------


def test_warmup_is_linear():
    total, warmup = 100, 10
    for name in ("cosine", "constant"):
        factors = [lr_factor(s, total, warmup, name, 0.1) for s in range(warmup)]
        assert factors == pytest.approx([(s + 1) / warmup for s in range(warmup)])
        steps = [b - a for a, b in zip(factors, factors[1:], strict=False)]
        assert steps == pytest.approx([1 / warmup] * (warmup - 1))
    assert lr_factor(warmup - 1, total, warmup, "cosine", 0.0) == pytest.approx(1.0)


@pytest.mark.parametrize("min_ratio", [0.0, 0.01, 0.5])
def test_cosine_decays_to_min_lr_ratio(min_ratio):
    total, warmup = 100, 10
    f = [lr_factor(s, total, warmup, "cosine", min_ratio) for s in range(total + 5)]
    assert f[warmup] == pytest.approx(1.0)  # the peak right after warmup
    mid = warmup + (total - warmup) // 2
    assert f[mid] == pytest.approx(min_ratio + (1 - min_ratio) * 0.5)
    assert f[total] == pytest.approx(min_ratio)
    assert all(x == pytest.approx(min_ratio) for x in f[total:])  # stays at the floor
    after = f[warmup:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:], strict=False))
    assert min(after) >= min_ratio - 1e-12 and max(f) <= 1.0 + 1e-12
    # The exact curve between warmup and the end.
    s = warmup + 30
    expected = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * 30 / (total - warmup)))
    assert f[s] == pytest.approx(expected)


def test_cosine_without_warmup_starts_at_one():
    assert lr_factor(0, 50, 0, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(50, 50, 0, "cosine", 0.0) == pytest.approx(0.0)


@pytest.mark.parametrize("warmup", [0, 5])
def test_constant_stays_at_one(warmup):
    factors = [lr_factor(s, 40, warmup, "constant", 0.3) for s in range(warmup, 60)]
    assert factors == [1.0] * len(factors)
