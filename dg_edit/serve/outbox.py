"""Frames waiting for one websocket client, coalesced so that a slow reader costs bounded memory.

Why: the engine produces a step every few milliseconds and must never wait for a client. A client
that reads slowly (a busy browser tab, a bad network) would otherwise pile up every draft of every
request. Here each request has one "latest step" slot: a new draft replaces the one still waiting,
keeping its place in line, so the reader always gets the newest draft and then the final frame.
Final frames (`done`, `cancelled`, `error`) are never dropped; if a client stops reading altogether
and they pile up past `max_finals`, `put_final` raises `OutboxFull` and the service closes that
connection (other clients are untouched: each has its own outbox and sender task).
"""

from __future__ import annotations

import asyncio
from collections import deque


class OutboxFull(Exception):
    """The client has not read its final frames for too long."""


class Outbox:
    """One client's pending frames: at most one step frame per request, final frames in order."""

    def __init__(self, max_finals: int = 256):
        self.max_finals = max_finals
        self._line: deque[tuple[str, str | None]] = deque()  # ("step", request id) or ("final", frame)
        self._steps: dict[str, str] = {}  # request id -> latest step frame not yet sent
        self._finals = 0
        self._ready = asyncio.Event()
        self.coalesced = 0  # step frames replaced before they were sent (a measure of client lag)

    def put_step(self, request_id: str, frame: str) -> None:
        if request_id in self._steps:
            self.coalesced += 1
        else:
            self._line.append(("step", request_id))
        self._steps[request_id] = frame
        self._ready.set()

    def put_final(self, frame: str) -> None:
        if self._finals >= self.max_finals:
            raise OutboxFull(f"client left {self._finals} final frames unread")
        self._finals += 1
        self._line.append(("final", frame))
        self._ready.set()

    def drop_steps(self, request_id: str) -> None:
        """Forget a waiting draft (the request was cancelled: the client no longer wants it)."""
        if self._steps.pop(request_id, None) is not None:
            self._line.remove(("step", request_id))

    def __len__(self) -> int:
        return len(self._line)

    async def get(self) -> str:
        """The next frame to send, waiting until there is one."""
        while not self._line:
            self._ready.clear()
            await self._ready.wait()
        kind, value = self._line.popleft()
        if kind == "step":
            return self._steps.pop(value)
        self._finals -= 1
        return value
