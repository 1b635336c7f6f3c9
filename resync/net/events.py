"""The daemon's events, for its API's event stream (Server-Sent Events and
the WebSocket, net.api): a bounded buffer of the latest, each with an id
one above the one before (from 1 at each start of the daemon, whose
instance id says which start), so that a client that reconnects with the
last id it saw gets what it missed — or, when the buffer has moved past
it, is told how many it lost (Syncthing's event ids, without its long poll:
its users found the poll lossy, syncthing#9922).

Types (``data`` in docs/api.md): ``TransferStarted``, ``TransferProgress``
(at most one a second per transfer), ``TransferEnded``, ``ConfigReloaded``;
and, sent to one client only, ``EventsMissed``.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque

BUFFER = 1000                    # events kept for clients that reconnect


class Events:
    """The buffer and its waiters (on the daemon's event loop)."""

    def __init__(self, size: int = BUFFER):
        self.buffer: deque[dict] = deque(maxlen=size)
        self.last_id = 0
        self._waiters: set[asyncio.Future] = set()
        self.closed = False

    def publish(self, kind: str, data: dict) -> dict:
        self.last_id += 1
        event = {"id": self.last_id, "time": time.time(), "type": kind, "data": data}
        self.buffer.append(event)
        self._wake()
        return event

    def _wake(self) -> None:
        for f in self._waiters:
            if not f.done():
                f.set_result(None)
        self._waiters.clear()

    def since(self, last_seen: int) -> tuple[list[dict], int]:
        """The buffered events after id ``last_seen``, and how many after it
        are no longer buffered (0 when none was lost). An id past the last
        one is a previous start's (the ids began again): all, from 1."""
        if last_seen > self.last_id:
            last_seen = 0
        first = self.buffer[0]["id"] if self.buffer else self.last_id + 1
        missed = max(0, first - last_seen - 1) if last_seen < self.last_id else 0
        return [e for e in self.buffer if e["id"] > last_seen], missed

    async def wait(self, timeout: float) -> None:
        """Until an event is published (or ``timeout`` s, or the buffer closes)."""
        if self.closed:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)

    def close(self) -> None:
        """Wake every waiter for good (the daemon stops)."""
        self.closed = True
        self._wake()


def missed_event(missed: int, first: int) -> dict:
    """What a client is told when the buffer moved past its last id."""
    return {"id": first - 1, "time": time.time(), "type": "EventsMissed",
            "data": {"missed": missed, "first_buffered": first}}
