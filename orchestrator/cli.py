"""`orchestrate`: the command users type.

    orchestrate job=cnn_digits                       # train on an embedded local Ray
    orchestrate job=cnn_digits trainer.num_workers=2 optim.lr=3e-3
    orchestrate job=cnn_digits --cfg job             # Hydra's own config printing
    orchestrate resume=<run id>                      # continue a stopped job in its run

Hydra composes and validates the config here, on the driver, before anything starts. Any
problem with it is one line on stderr naming the key and the fix, and exit code 2.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Hydra flags that only print something: handed to Hydra's own app unchanged.
_HYDRA_INFO_FLAGS = ("cfg", "help", "hydra_help", "info", "shell_completion", "resolve")


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _default_job() -> str:
    import yaml

    for entry in yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"]:
        if isinstance(entry, dict) and "job" in entry:
            return entry["job"]
    raise UserError(
        "job", "no job chosen", f"add job=<name>; one of: {', '.join(available('job'))}"
    )


def _chosen_job(overrides: list[str]) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = _parse(OverridesParser.create(), overrides)
    for o in parsed:
        if o.key_or_group == "job" and o.package is None:
            return str(o.value())
    for o in parsed:  # an experiment may pick its job (`override /job: x`): register that one
        if o.key_or_group == "experiment" and isinstance(o.value(), str):
            job = _experiment_job(str(o.value()))
            if job:
                return job
    return _default_job()


def _experiment_job(name: str) -> str | None:
    import yaml

    path = CONF_DIR / "experiment" / f"{name}.yaml"
    if not path.is_file():
        return None  # Hydra reports the unknown experiment while composing
    for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.removeprefix("override ").strip().lstrip("/") == "job":
                    return str(value)
    return None


def _parse(parser, overrides: list[str]):
    from hydra.errors import OverrideParseException

    try:
        return parser.parse_overrides(overrides)
    except OverrideParseException as exc:
        bad = next((o for o in overrides if _unparseable(parser, o)), " ".join(overrides))
        raise UserError(
            bad,
            f"cannot parse this override ({str(exc).splitlines()[0]})",
            "write key=value; quote values with spaces or brackets",
        ) from None


def _unparseable(parser, override: str) -> bool:
    try:
        parser.parse_overrides([override])
        return False
    except Exception:
        return True


def register_job(name: str):
    """Import the chosen job (only that one) and register its config schema with Hydra."""
    from orchestrator.config import register_schemas
    from orchestrator.job import load_job

    if name not in available("job"):
        raise UserError(
            "job", f"unknown job '{name}'", f"choose one of: {', '.join(available('job'))}"
        )
    spec = load_job(name)
    register_schemas({name: spec.config})
    return spec


def compose_config(overrides: list[str]) -> dict[str, Any]:
    """Compose, type-check and validate. Returns the resolved config as a plain dict."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from orchestrator.config import check_known_keys, validate

    name = _chosen_job(overrides)
    spec = register_job(name)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        plain: Any = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as exc:
        raise _as_user_error(exc) from None
    assert isinstance(plain, dict)
    if plain["job"]["name"] != name:
        raise UserError(
            "job.name",
            f"is '{plain['job']['name']}' but the job chosen is '{name}'",
            "choose jobs with job=<name> and leave job.name alone",
        )
    check_known_keys(plain, spec.config)
    validate(plain)
    return plain


def _as_user_error(exc: Exception) -> UserError:
    """Turn Hydra/OmegaConf's multi-line errors into one line naming the key and the fix."""
    import yaml
    from hydra.errors import MissingConfigException
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        MissingMandatoryValue,
        ValidationError,
    )

    cause = exc.__cause__ or exc
    if isinstance(cause, yaml.MarkedYAMLError) and cause.problem_mark is not None:
        # A config file (under conf/ or on hydra.searchpath) is not valid YAML: name the line.
        mark = cause.context_mark or cause.problem_mark
        return UserError(
            f"{mark.name}:{mark.line + 1}",
            f"malformed YAML ({cause.context or cause.problem})",
            "fix the YAML syntax there",
        )
    key = getattr(cause, "full_key", None) or ""
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if isinstance(exc, MissingConfigException) or "Could not find" in first:
        m = re.search(r"Could not find '([^']+)/([^'/]+)'", str(exc))
        if m:
            group, option = m.groups()
            return UserError(
                group,
                f"unknown {group} '{option}'",
                f"choose one of: {', '.join(available(group))}",
            )
        return UserError("config", first, "check the config name")
    if isinstance(cause, ValidationError):
        m = re.search(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", first)
        problem = f"expected {m.group(3).lower()}, got '{m.group(1)}'" if m else first.rstrip(".")
        return UserError(key or "override", problem, "fix the value's type")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        where = f" --package {parent}" if parent else ""
        return UserError(
            key or "override",
            "unknown key",
            f"check the spelling; list the valid keys with `orchestrate --cfg job{where}`",
        )
    if isinstance(cause, MissingMandatoryValue):
        return UserError(key, "has no value", f"set {key}=<value>")
    return UserError("config", first, "fix the config or the override")


def _hydra_app(argv: list[str]) -> None:
    """Hydra's own app, for --cfg/--help/--info: printing works exactly as Hydra users expect."""
    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def app(cfg) -> None:  # pragma: no cover - Hydra prints and returns before calling it
        pass

    sys.argv = ["orchestrate", *argv]
    app()


def _reject_sweeps_without_m(overrides: list[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for raw, o in zip(overrides, _parse(OverridesParser.create(), overrides), strict=True):
        if o.is_sweep_override():
            raise UserError(
                o.key_or_group, f"'{raw}' is a sweep", "add -m to run a sweep, or give one value"
            )


def main(argv: list[str] | None = None) -> int:
    started_at = time.time()
    # MLflow announces e.g. schema migrations of a new SQLite store at INFO; users need none of it.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    argv = list(sys.argv[1:] if argv is None else argv)
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    try:
        name = _chosen_job(args.overrides)
        if any(getattr(args, flag, None) for flag in _HYDRA_INFO_FLAGS):
            register_job(name)
            _hydra_app(argv)
            return 0
        if args.multirun:
            from orchestrator.sweep import run_sweep

            return run_sweep(args.overrides, argv, started_at)
        from orchestrator import resume

        overrides, resume_id = resume.split(args.overrides)
        if resume_id:
            overrides = resume.job_overrides(overrides, resume_id)
        _reject_sweeps_without_m(overrides)
        cfg = compose_config(overrides)
        from orchestrator.runner import run_job

        return run_job(cfg, argv, overrides, started_at, resume_id)
    except UserError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
