"""Keep an embedded run's DDP traffic on 127.0.0.1, like the embedded Ray itself.

torch's TCPStore, where DDP ranks meet (hosted by rank 0), listens on every interface (`::`)
whatever MASTER_ADDR says: on an embedded Ray it was the one port of the whole run reachable
from the network (tests/test_secure_defaults.py found it), unauthenticated. And gloo binds to
the address the hostname resolves to, which on many machines is the LAN address.

For the embedded cluster `launch` therefore points gloo at the loopback interface and asks for
`ProcessGroupConfig(loopback=True)` (orchestrator/process_group.py), whose backend makes each
worker swap torch's store factory for one whose server socket is bound to 127.0.0.1 before
Ray Train creates the process group. Imports no torch at the top: the controller loads this
module to send the workers `bind_rendezvous_to_loopback`.
"""

from __future__ import annotations

import socket

import psutil


def loopback_interface() -> str:
    """The name of the interface that carries 127.0.0.1 (`lo` on Linux, `lo0` on macOS)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addresses):
            return name
    return "lo"


def bind_rendezvous_to_loopback() -> None:
    """In a worker: rank 0's TCPStore listens on 127.0.0.1 only (other ranks are unchanged)."""
    import importlib

    from torch.distributed import TCPStore

    # By import path: `torch.distributed.rendezvous` as an attribute is a function of that name.
    rendezvous = importlib.import_module("torch.distributed.rendezvous")

    original = rendezvous._create_c10d_store
    if getattr(original, "loopback_only", False):
        return

    def create(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0 or rendezvous._torchelastic_use_agent_store():
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        return TCPStore(
            host_name=hostname,
            port=port,
            world_size=world_size,
            is_master=True,
            timeout=timeout,
            multi_tenant=True,
            master_listen_fd=listener.detach(),  # the store owns the socket from here on
            use_libuv=use_libuv,
        )

    create.loopback_only = True  # type: ignore[attr-defined]
    rendezvous._create_c10d_store = create  # type: ignore[attr-defined]
