"""One websocket connection: a bounded outbox drained by a single writer, and a rate limit.

Theory of operation
-------------------
* Anything sent to a client goes through ``send``, which never blocks and never grows memory
  beyond ``outbox_max_bytes`` / ``outbox_max_frames``: a client that stops reading is closed
  with 1013 (try again later) once its outbox is full. The frame is shared, not copied, so a
  relay to N members costs N references to one bytes object.
* Exactly one writer task per connection drains the outbox (``write_loop``); the transport's
  own flow control makes it wait while the socket is not writable.
* ``close`` may be called from anywhere (another connection's relay, the janitor, shutdown): it
  records the code, drops the outbox, cancels the reader and lets the writer send the close.
* A token bucket bounds messages per second; a flood is closed with 1013.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from collab import closecodes
from collab.ratelimit import TokenBucket

if TYPE_CHECKING:
    from collab.auth import Identity
    from collab.metrics import Metrics

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    outbox_max_bytes: int
    outbox_max_frames: int
    rate_limit: float
    rate_burst: int
    max_inflight: int


class Connection:
    def __init__(self, identity: Identity, room: str, limits: ConnectionLimits, metrics: Metrics,
                 clock: Callable[[], float], peer: str = "") -> None:
        self.id = f"c{next(_ids)}"
        self.identity = identity
        self.room = room
        self.peer = peer
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        now = clock()
        self.connected_at = now
        self.last_sent = now
        self.last_received = now
        self.bucket = TokenBucket(limits.rate_limit, limits.rate_burst, now)
        self.inflight = asyncio.Semaphore(limits.max_inflight)
        self.told_read_only = False
        self.peer_closed = False
        self.close_code: int | None = None
        self.close_reason = ""
        self._outbox: deque[bytes] = deque()
        self._outbox_bytes = 0
        self._wake = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Connection {self.id} room={self.room!r} user={self.identity.user_id!r}>"

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    @property
    def outbox_bytes(self) -> int:
        return self._outbox_bytes

    def send(self, frame: bytes) -> None:
        if self.close_code is not None:
            return
        self._outbox.append(frame)
        self._outbox_bytes += len(frame)
        if self._outbox_bytes > self.limits.outbox_max_bytes or len(self._outbox) > self.limits.outbox_max_frames:
            self.close(closecodes.TRY_AGAIN_LATER, "slow consumer")
            return
        self._wake.set()

    def close(self, code: int, reason: str) -> None:
        """Ask for this connection to end with ``code``; idempotent, callable from any task."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        self._outbox.clear()
        self._outbox_bytes = 0
        self.metrics.closes.labels(code=str(code)).inc()
        self._wake.set()
        self.stop_reader()

    def bind_reader(self, task: asyncio.Task[None] | None) -> None:
        self._reader = task

    def stop_reader(self) -> None:
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()

    async def write_loop(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        outbox = self._outbox
        wake = self._wake
        bytes_out = self.metrics.bytes_out
        while True:
            if not outbox:
                if self.close_code is not None:
                    return
                wake.clear()
                await wake.wait()
                continue
            frame = outbox.popleft()
            self._outbox_bytes -= len(frame)
            await send(frame)
            self.last_sent = self.clock()
            bytes_out.inc(len(frame))
