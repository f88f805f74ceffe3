"""Checkpoint files: one `state.pt` plus a `meta.json` carrying its SHA-256.

Written to a temporary name and renamed, so a crash mid-write never leaves a file that looks
complete; loaded with `weights_only=True`, so a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"
# Ray Train writes this beside a run's checkpoints each time it registers one
# (ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).
RAY_RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"


class CorruptCheckpoint(Exception):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save(state: dict[str, Any], directory: str | os.PathLike) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_path = directory / STATE_FILE
    _atomic_write(state_path, lambda p: torch.save(state, p))
    meta = {
        "sha256": _sha256(state_path),
        "epoch": state.get("epoch"),
        "step": state.get("global_step"),
    }
    _atomic_write(directory / META_FILE, lambda p: p.write_text(json.dumps(meta)))


def load(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    state_path, meta_path = directory / STATE_FILE, directory / META_FILE
    if not state_path.exists() or not meta_path.exists():
        raise CorruptCheckpoint(f"{directory}: missing {STATE_FILE} or {META_FILE}")
    try:
        expected = json.loads(meta_path.read_text())["sha256"]
    except (ValueError, KeyError):
        raise CorruptCheckpoint(f"{meta_path}: unreadable") from None
    if _sha256(state_path) != expected:
        raise CorruptCheckpoint(f"{state_path}: checksum mismatch (truncated or corrupted)")
    return torch.load(state_path, map_location="cpu", weights_only=True)


def _epoch_of(directory: Path) -> int:
    try:
        return int(json.loads((directory / META_FILE).read_text()).get("epoch") or -1)
    except (ValueError, OSError):
        return -1


def load_newest_intact(directory: str | os.PathLike) -> tuple[dict[str, Any], Path, list[str]]:
    """Load `directory`, or, when it is corrupt, the newest intact checkpoint beside it in its
    run's directory (Ray keeps the last `num_to_keep` side by side). Returns the state, where it
    came from and what was wrong with those skipped; raises CorruptCheckpoint if none is intact.
    """
    directory = Path(directory)
    try:
        return load(directory), directory, []
    except CorruptCheckpoint as exc:
        problems = [str(exc)]
    # Only now look beside it: the usual case (intact) reads no other checkpoint's metadata.
    for candidate in _older_checkpoints_of_the_same_run(directory):
        try:
            return load(candidate), candidate, problems
        except CorruptCheckpoint as exc:
            problems.append(str(exc))
    raise CorruptCheckpoint("no intact checkpoint: " + "; ".join(problems))


def _older_checkpoints_of_the_same_run(directory: Path) -> list[Path]:
    """The other checkpoints in `directory`'s run directory, newest first; none when `directory`
    is not in one. A checkpoint on cloud storage reaches us as Ray's download into
    `<tempdir>/checkpoint_tmp_<uuid>`: its siblings there are other runs' downloads."""
    run_dir = directory.parent
    if not (run_dir / RAY_RUN_SNAPSHOT).exists():
        return []
    others = (
        d
        for d in run_dir.iterdir()
        if d != directory and d.name.startswith("checkpoint_") and (d / META_FILE).exists()
    )
    return sorted(others, key=_epoch_of, reverse=True)
