"""Checks that run before anything starts: can we reach the tracking server and the cluster?

Each failure is a `UserError` within seconds, instead of MLflow's minutes of HTTP retries or
Ray's long connection timeouts.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.parse
import urllib.request

from orchestrator.errors import UserError

# Under 10 s in all, Python's start-up included, even when nothing answers at all.
TRACKING_TIMEOUT_S = 5.0
CLUSTER_TIMEOUT_S = 5.0


def resolve_tracking_uri(uri: str, cwd: str) -> str:
    """Make a relative sqlite path absolute: workers run in other directories."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.join(cwd, uri[len(prefix) :])
    return uri


def check_tracking(uri: str) -> None:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///") :]
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UserError(
                "tracking.uri",
                f"folder '{folder}' for the SQLite store does not exist or is not writable",
                "create it or point tracking.uri at a writable place",
            )
        return
    if parsed.scheme in ("http", "https"):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=TRACKING_TIMEOUT_S) as response:
                response.read(64)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise UserError(
                    "tracking.uri",
                    f"MLflow server at {uri} refused the credentials (HTTP {exc.code})",
                    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
                ) from None
            # Any other HTTP answer means something is listening; MLflow will say more.
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(
                "tracking.uri",
                f"cannot reach MLflow server at {uri} ({reason})",
                "start the server or fix tracking.uri",
            ) from None
        return
    if parsed.scheme in ("", "file"):
        raise UserError(
            "tracking.uri",
            f"'{uri}' is a plain file store, which MLflow 3 no longer accepts by default",
            "use sqlite:///mlflow.db or an http:// MLflow server",
        )
    if parsed.scheme not in ("postgresql", "mysql", "mssql", "databricks"):
        raise UserError(
            "tracking.uri",
            f"unsupported scheme '{parsed.scheme}'",
            "use sqlite:///mlflow.db or an http:// MLflow server",
        )


def check_cluster(address: str | None) -> None:
    if address is None:
        return
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            found = canonicalize_bootstrap_address("auto")
        except ConnectionError:
            found = None
        if not found:
            raise UserError(
                "cluster.address",
                "'auto' found no running Ray cluster on this machine",
                "start one with `ray start --head` or leave cluster.address unset for an embedded one",
            )
        # 'auto' also trusts /tmp/ray/ray_current_cluster, which outlives a head killed without
        # `ray stop`: check the address it found, or ray.init waits minutes on a dead one.
        address = found
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(
            "cluster.address",
            f"'{address}' is not host:port, ray://host:port or auto",
            "e.g. cluster.address=127.0.0.1:6379",
        )
    try:
        with socket.create_connection((host, int(port)), timeout=CLUSTER_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UserError(
            "cluster.address",
            f"cannot reach Ray at {address} ({exc.strerror or exc})",
            "start the cluster (`ray start --head`) or fix cluster.address",
        ) from None


def check_model_source(key: str, source: str | None, tracking_uri: str) -> None:
    """A model to start from (e.g. `job.init_from`) must exist before anything starts."""
    if not source:
        return
    scheme = source.split(":/", 1)[0] if ":/" in source else ""
    if scheme and scheme not in ("models", "runs"):
        return  # s3://, gs://, ...: the loader on the workers reports what is wrong
    if not scheme:
        if not os.path.isabs(source):
            raise UserError(key, f"'{source}' is a relative path", "give an absolute path")
        if not os.path.isfile(os.path.join(source, "meta.json")):
            raise UserError(
                key,
                f"no checkpoint at '{source}' (no meta.json)",
                "give a checkpoint directory written by this orchestrator, or a models:/ URI",
            )
        return
    fix = "register one first (e.g. tracking.register_as=NAME on the job that trains it) or fix the URI"
    if tracking_uri.startswith("sqlite:///") and not os.path.exists(tracking_uri[10:]):
        raise UserError(key, f"'{source}' not found: {tracking_uri} does not exist yet", fix)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    body = source.split(":/", 1)[1].strip("/")
    try:
        if scheme == "runs":
            client.get_run(body.split("/", 1)[0])
        elif "@" in body:
            client.get_model_version_by_alias(*body.split("@", 1))
        elif "/" in body:
            client.get_model_version(*body.rsplit("/", 1))
        else:
            client.get_registered_model(body)
    except Exception:
        raise UserError(key, f"'{source}' not found in {tracking_uri}", fix) from None
