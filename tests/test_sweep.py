"""Sweep grammar → Ray Tune search space, and trial configs (no Ray started)."""

from __future__ import annotations

import itertools

import pytest
from ray import tune

from orchestrator.cli import compose_config
from orchestrator.errors import UserError
from orchestrator.sweep import Dimension, split_overrides, trial_config

GROUPS = ["optim", "sched"]


def dims_of(*overrides: str) -> dict[str, Dimension]:
    fixed, dims = split_overrides(list(overrides), GROUPS)
    assert fixed == [o for o in overrides if "," not in o and "(" not in o]
    return {d.key: d for d in dims}


def test_every_form_of_the_grammar():
    d = dims_of(
        "job=cnn_digits",
        "optim.lr=tag(log,interval(1e-4,1e-1))",
        "optim.weight_decay=0,1e-4,1e-3",
        "trainer.batch_size=choice(32,64,128)",
        "seed=range(1,4)",
        "job.dropout=interval(0.1,0.5)",
        "optim=adamw,sgd",
    )
    assert d["optim.lr"] == Dimension("optim.lr", "loguniform", low=1e-4, high=1e-1)
    assert d["optim.weight_decay"].values == (0, 1e-4, 1e-3)
    assert d["trainer.batch_size"].values == (32, 64, 128)
    assert d["seed"].values == (1, 2, 3)
    assert d["job.dropout"].kind == "uniform"
    assert d["optim"].group and not d["optim.lr"].group
    lr = d["optim.lr"].to_tune(grid=False)
    assert isinstance(lr, tune.search.sample.Float) and isinstance(
        lr.sampler, tune.search.sample.LogUniform
    )
    assert isinstance(d["job.dropout"].to_tune(grid=False).sampler, tune.search.sample.Uniform)
    assert isinstance(d["seed"].to_tune(grid=False), tune.search.sample.Categorical)
    assert d["trainer.batch_size"].to_tune(grid=True) == {"grid_search": [32, 64, 128]}


def test_grid_cannot_enumerate_an_interval():
    with pytest.raises(UserError) as err:
        dims_of("optim.lr=interval(1e-4,1e-1)")["optim.lr"].to_tune(grid=True)
    assert err.value.key == "optim.lr"


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=interval(0.1,0.01)", "optim.lr"),  # inverted
        ("optim.lr=tag(log,interval(0,0.1))", "optim.lr"),  # log of zero
        ("seed=range(3,3)", "seed"),  # empty
        ("job=cnn_digits,mlp_tabular", "job"),  # the job itself
    ],
)
def test_bad_spaces_name_the_key(override, key):
    with pytest.raises(UserError) as err:
        split_overrides([override], GROUPS)
    assert err.value.key == key


def test_trial_config_applies_groups_then_keys_with_the_schema_types():
    base = compose_config(["job=mlp_tabular"])
    sgd = compose_config(["job=mlp_tabular", "optim=sgd"])["optim"]
    cfg = trial_config(
        base, {"optim": {"sgd": sgd}}, {"optim": "sgd", "optim.lr": 0.2, "optim.weight_decay": 0}
    )
    assert cfg["optim"]["name"] == "sgd" and cfg["optim"]["lr"] == 0.2
    assert cfg["optim"]["weight_decay"] == 0.0 and isinstance(cfg["optim"]["weight_decay"], float)
    assert base["optim"]["name"] == "adamw"  # the base is not mutated


def test_space_written_in_config_merges_with_the_command_line():
    from orchestrator.sweep import with_config_space

    base = compose_config(["job=cnn_digits", "sweep=cnn_digits_asha"])
    assert base["sweep"]["scheduler"] == "asha" and base["sweep"]["num_samples"] == 16
    _, command_line = split_overrides(["optim.weight_decay=0,0.5"], GROUPS)
    dims = {d.key: d for d in with_config_space(base, command_line, GROUPS)}
    assert dims["optim.lr"].kind == "loguniform"
    assert dims["trainer.batch_size"].values == (32, 64, 128)
    assert dims["optim.weight_decay"].values == (0, 0.5)  # the command line wins


def test_optuna_search_is_tpe():
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.sweep import _search

    assert isinstance(_search("optuna", "val/acc", "max"), OptunaSearch)
    assert _search("random", "val/acc", "max") is None


def test_sweep_syntax_without_m_is_a_clear_error(tmp_path):
    from tests.conftest import run_cli

    out = run_cli(["job=mlp_tabular", "optim.lr=1e-3,1e-2"], tmp_path, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: optim.lr: 'optim.lr=1e-3,1e-2' is a sweep — add -m to run a sweep, or give one value"
    )


@pytest.mark.parametrize(
    "overrides, same",
    [
        (["optim=adamw,sgd", "optim.lr=1e-3,1e-2", "trainer.batch_size=16,32"], True),
        (["sched=constant,cosine", "trainer.max_epochs=2,4"], True),
        (["optim.lr=1e-3,1e-2", "job.dropout=0.1,0.3"], False),
        (["job.split_seed=0,1"], False),
        (["seed=0,1"], False),
    ],
)
def test_a_sweep_builds_its_data_once_only_when_no_trial_reads_other_data(overrides, same):
    from orchestrator import shared_data
    from orchestrator.sweep import _validate_space

    fixed = ["job=mlp_tabular"]
    dims = list(dims_of(*overrides).values())
    assert shared_data.same_for_every_trial([d.key for d in dims]) is same
    # What the tasks read (the job section and the seed), in every corner of the grid.
    base = compose_config(fixed)
    options = _validate_space(fixed, dims)
    read = set()
    for values in itertools.product(*(d.values for d in dims)):
        cfg = trial_config(base, options, {d.key: v for d, v in zip(dims, values, strict=True)})
        read.add(repr((cfg["job"], cfg["seed"])))
    assert (len(read) == 1) is same
