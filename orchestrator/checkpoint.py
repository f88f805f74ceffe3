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
    expected = json.loads(meta_path.read_text())["sha256"]
    if _sha256(state_path) != expected:
        raise CorruptCheckpoint(f"{state_path}: checksum mismatch (truncated or corrupted)")
    return torch.load(state_path, map_location="cpu", weights_only=True)
