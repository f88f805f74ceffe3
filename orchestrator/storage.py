"""Checkpoint storage that every node of a cluster can reach: the pieces of the check.

Ray Train (2.7+) has each worker write its checkpoints straight to `RunConfig.storage_path`
and reads them back on restarts (and on the driver, for the final model) from wherever it
runs. On one machine any local folder works; on several it must be a mount every node shares
(NFS, EFS, a Kubernetes ReadWriteMany volume) or an object-store URI. A path that exists on
every node but is not the *same* storage (each node's own ./outputs/ray) is the trap: it
fails only at the first checkpoint, or silently on restart. So instead of guessing from the
path, `launch.check_storage_shared` writes a marker here and asks every other node to read
it back with `sees_marker`.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from orchestrator.errors import UserError

MARKER_DIR = ".orchestrator-storage-check"


def is_remote_uri(path: str) -> bool:
    """s3://, gs://, abfs://, hdfs://... are shared by construction; file:// and plain paths are not."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.lower() != "file" and scheme.isidentifier()


def write_marker(storage_path: str) -> tuple[Path, str]:
    """A file under `storage_path` holding a random token. Returns its path and the token."""
    folder = Path(storage_path.removeprefix("file://")) / MARKER_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        marker = folder / f"{token[:12]}.marker"
        marker.write_text(token)
    except OSError as exc:
        raise UserError(
            "cluster.storage_path",
            f"cannot write to '{storage_path}' ({exc.strerror or exc})",
            "point cluster.storage_path at a writable shared folder or an s3:// / gs:// URI",
        ) from None
    return marker, token


def sees_marker(marker: str, token: str) -> bool:
    """Run on another node: is this the same file, with the same token? (Never raises.)"""
    try:
        return Path(marker).read_text() == token
    except OSError:
        return False


def not_shared_error(storage_path: str, blind_nodes: list[str], others: int) -> UserError:
    return UserError(
        "cluster.storage_path",
        f"'{storage_path}' is node-local: {len(blind_nodes)} of the cluster's {others} other "
        f"node(s) cannot see it ({', '.join(blind_nodes)}), and Ray Train needs checkpoint "
        "storage every node can reach",
        "mount shared storage (NFS, a ReadWriteMany volume) at the same path on every node and "
        "set cluster.storage_path to it, or use an object-store URI such as "
        "cluster.storage_path=s3://bucket/ray",
    )
