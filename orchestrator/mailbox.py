"""The channel from rank 0 to the driver: progress events one way, replies the other.

Rank 0 posts progress ticks (dropped if the driver falls behind), sends events the driver
must see (the outcome), and makes requests the driver answers: its metrics, which the driver
hands to MLflow. That is why workers hold no MLflow client (~90 MiB each,
benchmarks/NOTES.md), and why rank 0 waits for the reply before it reports a checkpoint: once a
checkpoint exists, the metrics before it are in MLflow or in the driver's spill file, so a
driver killed at any moment loses none.

One small actor of 0 CPUs holds the mail; the driver (or a sweep trial) drains it.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import ray


@ray.remote(num_cpus=0)  # must never take a slot a training worker needs
class _Inbox:
    """An asyncio actor: a bounded FIFO of events, and replies waited for by request id."""

    def __init__(self, maxsize: int) -> None:
        self.events: asyncio.Queue = asyncio.Queue(maxsize)
        self.replies: dict[str, Any] = {}
        self.answered: dict[str, asyncio.Event] = {}

    async def put(self, event: dict[str, Any]) -> None:
        await self.events.put(event)

    async def put_nowait(self, event: dict[str, Any]) -> bool:
        try:
            self.events.put_nowait(event)
            return True
        except asyncio.QueueFull:
            return False

    async def take(self, timeout: float) -> list[dict[str, Any]]:
        """Every event waiting, after waiting up to `timeout` for the first."""
        try:
            out = [await asyncio.wait_for(self.events.get(), timeout)]
        except TimeoutError:
            return []
        while not self.events.empty():
            out.append(self.events.get_nowait())
        return out

    async def reply(self, request_id: str, value: Any) -> None:
        self.replies[request_id] = value
        self.answered.setdefault(request_id, asyncio.Event()).set()

    async def wait_reply(self, request_id: str, timeout: float) -> tuple[bool, Any]:
        answered = self.answered.setdefault(request_id, asyncio.Event())
        try:
            await asyncio.wait_for(answered.wait(), timeout)
        except TimeoutError:
            return False, None
        del self.answered[request_id]
        return True, self.replies.pop(request_id)


class Mailbox:
    """A handle on the inbox actor; it pickles, so it travels to the workers in their config."""

    def __init__(self, maxsize: int = 10_000, name: str | None = None) -> None:
        # A name lets another process post to it (a sweep's driver stopping a trial).
        options = {"name": name} if name else {}
        self.actor = _Inbox.options(**options).remote(maxsize)  # type: ignore[attr-defined]

    # --- rank 0's side

    def post(self, event: dict[str, Any]) -> None:
        """Fire and forget: no round trip, and dropped if the inbox is full (progress ticks)."""
        self.actor.put_nowait.remote(event)

    def send(self, event: dict[str, Any], timeout: float = 60) -> None:
        """Returns once the inbox holds the event; raises after `timeout` seconds."""
        ray.get(self.actor.put.remote(event), timeout=timeout)

    def request(self, event: dict[str, Any], timeout: float) -> Any:
        """Send the event and wait for the driver's reply; TimeoutError if none comes."""
        request_id = uuid.uuid4().hex
        self.send({**event, "reply_to": request_id}, timeout)
        answered, value = ray.get(
            self.actor.wait_reply.remote(request_id, timeout), timeout=timeout + 30
        )
        if not answered:
            raise TimeoutError(f"no reply from the driver in {timeout:.0f} s")
        return value

    # --- the driver's side

    def take(self, timeout: float = 0.25) -> list[dict[str, Any]]:
        return ray.get(self.actor.take.remote(timeout))

    def reply(self, request_id: str, value: Any) -> None:
        self.actor.reply.remote(request_id, value)


def post_to(name: str, event: dict[str, Any]) -> bool:
    """Fire and forget `event` to the inbox named `name`; False if there is none (any more)."""
    try:
        actor = ray.get_actor(name)
    except ValueError:
        return False
    actor.put_nowait.remote(event)
    return True


def drain_while_alive(mailbox: Mailbox, thread, on_event, until=lambda: False) -> None:
    """Drain while `thread` (the one running `fit`) lives, then once more for the last events.
    Returns early, without the last drain, once `until()` is true."""
    while thread.is_alive():
        if until():
            return
        drain(mailbox, on_event)
    drain(mailbox, on_event, timeout=0.5)


def drain(mailbox: Mailbox, on_event, timeout: float = 0.25) -> None:
    """Hand every waiting event to `on_event` (waiting up to `timeout` for the first), and send
    its return value back as the reply to events that asked for one."""
    for event in mailbox.take(timeout):
        answer = on_event(event)
        if event.get("reply_to") is not None:
            mailbox.reply(event["reply_to"], answer)
