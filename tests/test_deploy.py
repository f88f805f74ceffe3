"""deploy/: every manifest parses and names only things that exist (no Docker or cluster here).

    pytest tests/test_deploy.py -q

Checked: YAML parses; Dockerfiles use known instructions, Ray's base image at the pinned Ray
version, and COPY only what exists; images are ours (at our versions) or official ones;
every `orchestrate` / `orchestrate-jobs` command in the manifests and deploy/README.md names
a console script of pyproject.toml, an existing job, and overrides that compose and validate
as `orchestrate` would; KubeRay resources enable token auth; the MLflow server runs basic
auth with allowed hosts; no secret value is written into any file.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import available, compose_config

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; pyproject.toml is read, not imported
ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
YAMLS = sorted(DEPLOY.rglob("*.yaml"))
# Each Dockerfile and the folder it is built from (see the build commands in deploy/README.md).
DOCKERFILES = {DEPLOY / "Dockerfile": ROOT, DEPLOY / "mlflow" / "Dockerfile": DEPLOY / "mlflow"}
INSTRUCTIONS = {
    "FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT",
    "CMD", "LABEL", "HEALTHCHECK", "SHELL", "VOLUME", "STOPSIGNAL",
}  # fmt: skip
OFFICIAL_IMAGES = {"postgres:16"}


def pinned(package: str) -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        name, _, version = dep.partition("==")
        if re.sub(r"\[.*\]", "", name) == package:
            return version
    raise AssertionError(f"{package} is not pinned in pyproject.toml")


RAY, MLFLOW, VERSION = pinned("ray"), pinned("mlflow"), PYPROJECT["project"]["version"]


def documents() -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAMLS for d in yaml.safe_load_all(p.read_text()) if d is not None]


def walk(node, key: str):
    """Every value stored under `key`, anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())  # line continuations
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# --- Every file parses --------------------------------------------------------------------


def test_every_yaml_manifest_parses():
    assert {p.relative_to(DEPLOY).as_posix() for p in YAMLS} >= {
        "kubernetes/raycluster.yaml",
        "kubernetes/rayjob.yaml",
        "kubernetes/mlflow.yaml",
        "mlflow/compose.yaml",
        "vms/cluster.yaml",
    }
    for path, doc in documents():
        assert isinstance(doc, dict), path
        if path.parent.name == "kubernetes":
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_parses_and_copies_what_exists(dockerfile):
    steps = dockerfile_instructions(dockerfile)
    assert all(word in INSTRUCTIONS for word, _ in steps), steps
    assert steps[0][0] in ("FROM", "ARG") and any(w == "FROM" for w, _ in steps)
    context = DOCKERFILES[dockerfile]
    for word, rest in steps:
        if word in ("COPY", "ADD"):
            sources = [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
            for source in sources:
                assert (context / source).exists(), f"{dockerfile}: COPY {source} is missing"


def test_project_image_is_rays_at_the_pinned_version():
    steps = dockerfile_instructions(DEPLOY / "Dockerfile")
    (base,) = [rest for word, rest in steps if word == "FROM"]
    variant = next(rest for word, rest in steps if word == "ARG" and rest.startswith("VARIANT="))
    image = base.replace("${VARIANT}", variant.split("=", 1)[1])
    assert image == f"rayproject/ray:{RAY}-py311-cpu"  # Ray's tag: version-python-platform
    installs = " ".join(rest for word, rest in steps if word == "RUN")
    assert "torch==" + pinned("torch") in installs and "pip install --no-cache-dir -e ." in installs


def test_mlflow_image_pins_the_projects_mlflow():
    installs = " ".join(
        rest for word, rest in dockerfile_instructions(DEPLOY / "mlflow" / "Dockerfile")
    )
    assert f"mlflow=={MLFLOW}" in installs


def test_images_are_ours_at_our_versions_or_official():
    ours = {f"orchestrator:{VERSION}", f"orchestrator-mlflow:{MLFLOW}"}
    for path, doc in documents():
        for image in walk(doc, "image"):
            name = image.rsplit("/", 1)[-1] if image.startswith("registry.") else image
            assert name in ours | OFFICIAL_IMAGES, f"{path}: image {image}"
    for path, doc in documents():
        for version in walk(doc, "rayVersion"):
            assert version == RAY, f"{path}: rayVersion {version}"


def test_build_contexts_and_mounted_files_exist():
    compose = yaml.safe_load((DEPLOY / "mlflow" / "compose.yaml").read_text())
    for service in compose["services"].values():
        if "build" in service:
            assert (DEPLOY / "mlflow" / service["build"] / "Dockerfile").is_file()
    text = (DEPLOY / "README.md").read_text()
    for name in re.findall(r"`((?:deploy/)?[\w./-]+\.(?:yaml|sh|example|md)|Dockerfile)`", text):
        path = ROOT / name if name.startswith("deploy/") else DEPLOY / name
        assert path.exists(), f"deploy/README.md names {name}, which does not exist"


# --- Commands, jobs and config keys -----------------------------------------------------


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every orchestrate* command in deploy/ (manifests, comments, README)."""
    found = []
    for path in sorted(DEPLOY.rglob("*")):
        if not path.is_file() or path.suffix not in (".yaml", ".md", ".sh", ""):
            continue
        text = path.read_text()
        if path.suffix == ".yaml":  # folded entrypoints (`>-`) come back as one line
            for doc in yaml.safe_load_all(text):
                for entry in walk(doc, "entrypoint"):
                    found.append((f"{path.name} entrypoint", shlex.split(entry)))
        for line in re.sub(r"\\\n\s*", " ", text).splitlines():
            if path.suffix == ".yaml" and not line.lstrip().startswith("#"):
                continue  # YAML values were read above; comments hold the how-to commands
            line = line.strip().lstrip("#").strip()
            if re.match(r"(orchestrate|orchestrate-jobs) ", line):
                found.append((f"{path.name}: {line[:60]}", shlex.split(line)))
    return found


COMMANDS = commands()


def test_deploy_files_show_commands():
    where = " ".join(w for w, _ in COMMANDS)
    for name in ("README.md", "raycluster.yaml", "rayjob.yaml entrypoint", "cluster.yaml"):
        assert name in where, f"no orchestrate command in {name}"


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_command_names_a_script_a_job_and_valid_overrides(where, argv):
    assert argv[0] in PYPROJECT["project"]["scripts"], f"{where}: no console script {argv[0]}"
    if argv[0] == "orchestrate-jobs":
        assert argv[1] in ("submit", "status", "logs", "stop", "list"), where
        if argv[1] != "submit":
            return
        assert "--" in argv, f"{where}: overrides go after --"
        overrides = argv[argv.index("--") + 1 :]
    else:
        overrides = argv[1:]
    jobs = [o.split("=", 1)[1] for o in overrides if o.startswith("job=")]
    assert jobs and jobs[0] in available("job"), f"{where}: job {jobs}"
    assert all("=" in o and not o.startswith("-") for o in overrides), where
    compose_config(overrides)  # raises UserError naming the key if any override is wrong


# --- Security settings ----------------------------------------------------------------


def test_kuberay_resources_enable_token_auth():
    kinds = {}
    for path, doc in documents():
        if doc.get("apiVersion") == "ray.io/v1":
            spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
            assert spec["authOptions"]["mode"] == "token", path
            kinds[doc["kind"]] = spec["authOptions"]["secretName"]
    assert kinds.keys() == {"RayCluster", "RayJob"}


def test_vm_cluster_uses_tokens_and_a_loopback_dashboard():
    cfg = yaml.safe_load((DEPLOY / "vms" / "cluster.yaml").read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["worker_start_ray_commands"] if "start" in c)


def test_mlflow_server_runs_basic_auth_with_allowed_hosts_on_postgres():
    script = (DEPLOY / "mlflow" / "entrypoint.sh").read_text()
    assert (
        "--app-name basic-auth" in script and '--allowed-hosts "${MLFLOW_ALLOWED_HOSTS}"' in script
    )
    assert 'DB="postgresql+psycopg2://' in script and '--backend-store-uri "${DB}"' in script
    assert "default_permission = NO_PERMISSIONS" in script
    compose = yaml.safe_load((DEPLOY / "mlflow" / "compose.yaml").read_text())
    assert compose["services"]["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    assert "ports" not in compose["services"]["postgres"]
    (server,) = [d for _, d in documents() if d.get("kind") == "Deployment"]
    env = {e["name"]: e for e in server["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "mlflow:5000" in env["MLFLOW_ALLOWED_HOSTS"]["value"].split(",")


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|auth_token", re.IGNORECASE)


def test_no_secret_values_are_committed():
    for path, doc in documents():
        assert doc.get("kind") != "Secret", f"{path}: create Secrets with kubectl, not in git"
        for env in walk(doc, "env"):
            items = env.items() if isinstance(env, dict) else [(e["name"], e) for e in env]
            for name, entry in items:
                if not SECRET_NAME.search(name):
                    continue
                if isinstance(entry, dict):  # Kubernetes: must come from a Secret
                    assert "secretKeyRef" in entry.get("valueFrom", {}), f"{path}: {name}"
                else:  # compose: must be a ${VARIABLE} from .env
                    assert re.fullmatch(r"\$\{\w+(:\?[^}]*)?\}", str(entry)), f"{path}: {name}"
    example = (DEPLOY / "mlflow" / "env.example").read_text()
    for line in example.splitlines():
        if SECRET_NAME.search(line.split("=", 1)[0]) and "=" in line:
            assert line.split("=", 1)[1] == "change-me", line
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()
