"""Secure by default, checked for real.

    pytest tests/test_secure_defaults.py -q

* An embedded run (a sweep, so the dashboard is up too) listens on loopback only: every
  socket its Ray processes and DDP workers listen on is 127.0.0.1 / ::1, inspected with psutil
  while training runs.
* Checkpoints load with `weights_only=True` everywhere, and a checkpoint whose pickle would
  run code is refused without running it.
* Hydra's `instantiate` / `_target_` (which call whatever a config names) stay unused.
"""

from __future__ import annotations

import ast
import hashlib
import ipaddress
import json
from pathlib import Path

import psutil
import pytest
import torch

from orchestrator import checkpoint
from tests.conftest import training_under_way

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "orchestrator").rglob("*.py"), *(ROOT / "jobs").rglob("*.py")])


def listening(root: psutil.Process) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket and bound UDP socket of
    `root` and its descendants."""
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = f"{proc.name()} ({' '.join(proc.cmdline())})"
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN or (
                    conn.status == psutil.CONN_NONE and not conn.raddr
                ):
                    found.append((name, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:  # a process that ended meanwhile listens on nothing
            continue
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1
    return address.is_loopback


@pytest.mark.slow
def test_embedded_run_listens_on_loopback_only(tmp_path):
    args = [
        "-m",
        "job=mlp_tabular",
        "sweep.num_samples=1",
        "optim.lr=choice(3e-3)",  # a one-point space: one trial
        "trainer.num_workers=2",
        "trainer.max_epochs=1000",  # still training while we look
    ]
    # Training under way: DDP's process group and its store exist.
    with training_under_way(args, tmp_path, timeout=420) as proc:
        sockets = listening(psutil.Process(proc.pid))
    exposed = [s for s in sockets if not is_loopback(s[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    # Not vacuous: Ray's GCS, the dashboard and the DDP workers were all looked at.
    names = " ".join(name for name, _, _ in sockets)
    for part in ("gcs_server", "dashboard/dashboard.py", "RayTrainWorker"):
        assert part in names, f"no listening socket of {part} among {sockets}"


def torch_load_calls(path: Path) -> list[ast.Call]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "load"):
            if (
                ast.unparse(node.func) == "torch.load"
                or "from torch import load" in path.read_text()
            ):
                calls.append(node)
    return calls


def test_every_torch_load_is_weights_only():
    calls = {p: torch_load_calls(p) for p in SOURCES}
    assert calls[ROOT / "orchestrator" / "checkpoint.py"], (
        "checkpoint.py no longer uses torch.load?"
    )
    for path, found in calls.items():
        for call in found:
            flags = {k.arg: k.value for k in call.keywords}
            assert "weights_only" in flags and ast.literal_eval(flags["weights_only"]) is True, (
                f"{path.relative_to(ROOT)}:{call.lineno}: torch.load without weights_only=True"
            )


class _RunsCode:
    """Unpickling this calls `Path.touch(marker)`: a stand-in for any code an attacker wants."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "ckpt"
    checkpoint.save({"model": {}, "epoch": 1}, folder)
    torch.save({"model": _RunsCode(marker), "epoch": 1}, folder / checkpoint.STATE_FILE)
    # A valid checksum: the file is exactly what someone with write access to storage put there.
    digest = hashlib.sha256((folder / checkpoint.STATE_FILE).read_bytes()).hexdigest()
    (folder / checkpoint.META_FILE).write_text(json.dumps({"sha256": digest, "epoch": 1}))

    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoint.load(folder)
    assert not marker.exists(), "the checkpoint's code ran"
    # The unsafe way would have run it: proof that the file really carries code.
    torch.load(folder / checkpoint.STATE_FILE, weights_only=False)
    assert marker.exists()


def test_hydra_instantiate_and_target_stay_unused():
    """`instantiate` calls whatever `_target_` a config names, and configs come from other
    people. Nothing uses it today; adding it needs an allowlist (DESIGN.md §4.5), and this test
    is where to say so."""
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and "hydra" in node.module:
                names = {a.name for a in node.names}
                assert not names & {"instantiate", "call", "get_method", "get_class"}, path
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("instantiate",), f"{path}:{node.lineno}"
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        assert "_target_" not in path.read_text(), path
