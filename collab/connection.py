"""One websocket connection: a bounded outbox drained by a single writer, and a rate limit.

Theory of operation
-------------------
* Anything sent to a client goes through ``send``, which never blocks and never grows memory
  beyond ``outbox_max_bytes`` / ``outbox_max_frames``: a client that stops reading is closed
  with 1013 (try again later) once its outbox is full. The frame is shared, not copied, so a
  relay to N members costs N references to one bytes object.
* Frames go out in one of two ways. On our own websocket protocol (``collab.wsfast``) the
  outbox holds whole websocket frames (``wire``: header included — a relayed update's is built
  once for every member, see ``push_encoded``) and is flushed once per event-loop iteration,
  every queued frame in one write, straight from the loop — no task per connection; while the
  transport is over its high-water mark the frames wait in the outbox and the transport's
  ``resume_writing`` flushes them. On other uvicorn protocols the outbox holds message payloads
  and exactly one writer task per connection drains it (``write_loop``).
* ``close`` may be called from anywhere (another connection's relay, the janitor, shutdown): it
  records the code, drops the outbox, cancels the reader and lets the writer send the close.
* A token bucket bounds messages per second; a flood is closed with 1013.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from collab import closecodes
from collab.ratelimit import TokenBucket
from collab.wsfast import wire_frame, wire_payload

if TYPE_CHECKING:
    from collab.auth import Identity
    from collab.metrics import Metrics
    from collab.wsfast import FastWebSocketProtocol as FastSocket

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    outbox_max_bytes: int
    outbox_max_frames: int
    rate_limit: float
    rate_burst: int
    max_inflight: int
    max_inflight_bytes: int


class InflightLimit:
    """At most ``limit`` updates and ``limit_bytes`` bytes of one connection awaiting commit (one
    update bigger than ``limit_bytes`` passes alone). ``try_acquire`` for the synchronous path;
    ``acquire`` for the reader task, the only one that ever waits -- and while it waits,
    ``try_acquire`` refuses: the waiting update was received first.

    Both bounds: the count alone let a connection hold 256 updates of up to ``max_frame_bytes``
    each (4 GiB), yet throttled a client sending small updates fast (a bulk import) to 256 per
    commit cycle -- 71-79% of pycrdt's in-process rate in the automerge-paper replay, 100-106%
    with room for 1,024."""

    __slots__ = ("limit", "limit_bytes", "count", "bytes", "_released", "_waiting")

    def __init__(self, limit: int, limit_bytes: int) -> None:
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.count = 0
        self.bytes = 0
        self._released: asyncio.Event | None = None
        self._waiting = False

    def try_acquire(self, size: int) -> bool:
        if self._waiting or self.count >= self.limit:
            return False
        if self.count and self.bytes + size > self.limit_bytes:
            return False
        self.count += 1
        self.bytes += size
        return True

    async def acquire(self, size: int) -> None:
        """Wait until at most half of each bound is in flight (not just room for one): a client
        that outruns storage then goes back to the fast path for a run of updates, instead of
        trickling through this task one update per commit."""
        self._waiting = True
        try:
            while self.count and (self.count > self.limit // 2 or self.bytes > self.limit_bytes // 2
                                  or self.bytes + size > self.limit_bytes):
                if self._released is None:
                    self._released = asyncio.Event()
                self._released.clear()
                await self._released.wait()
        finally:
            self._waiting = False
        self.count += 1
        self.bytes += size

    def release(self, size: int) -> None:
        self.count -= 1
        self.bytes -= size
        if self._released is not None:
            self._released.set()


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
        self.inflight = InflightLimit(limits.max_inflight, limits.max_inflight_bytes)
        self.told_read_only = False
        self.peer_closed = False
        self.close_code: int | None = None
        self.close_reason = ""
        # A list, not a deque: an empty deque is ~600 bytes, times every idle connection. It is
        # only ever emptied whole (flush, close) or swapped out (write_loop).
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        self._wake: asyncio.Event | None = None  # the writer task's (other uvicorn protocols only)
        self._reader: asyncio.Task[None] | None = None
        self._socket: FastSocket | None = None
        self.wire = False  # the outbox holds whole websocket frames (a fast socket is attached)
        self._flush_scheduled = False

    def __repr__(self) -> str:
        return f"<Connection {self.id} room={self.room!r} user={self.identity.user_id!r}>"

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    @property
    def outbox_bytes(self) -> int:
        return self._outbox_bytes

    def send(self, frame: bytes) -> None:
        if self.push(frame):
            if self._socket is None:
                self._wake_writer()
            else:
                self._schedule_flush()

    def push(self, frame: bytes) -> bool:
        """Queue the message ``frame`` without arranging for it to be written: the caller calls
        ``flush`` (a room relaying a batch writes each member's share once). False if not queued."""
        return self._queue(wire_frame(frame) if self.wire else frame)

    def push_encoded(self, frame: bytes, wire: bytes) -> bool:
        """``push`` for a message whose websocket frame ``wire`` (``wire_frame(frame)``) the caller
        built once for every receiver."""
        return self._queue(wire if self.wire else frame)

    def deliver(self, frame: bytes, wire: bytes) -> bool:
        """``push_encoded`` and ``flush`` at once, for a message alone in its batch: written
        straight to the socket when nothing of this connection's waits (nearly always)."""
        socket = self._socket
        if (socket is None or self._outbox or self.close_code is not None
                or socket.write_paused or socket.close_sent or socket.disconnected):  # writable_now, inline
            if not self._queue(wire if self.wire else frame):
                return False
            self.flush()
            return True
        socket.write_frame(wire)
        self.last_sent = self.clock()
        self.metrics.bytes_out.value += len(wire)
        return True

    def _queue(self, data: bytes) -> bool:
        if self.close_code is not None:
            return False
        self._outbox.append(data)
        self._outbox_bytes += len(data)
        if self._outbox_bytes > self.limits.outbox_max_bytes or len(self._outbox) > self.limits.outbox_max_frames:
            self.close(closecodes.TRY_AGAIN_LATER, "slow consumer")
            return False
        return True

    def attach_socket(self, socket: FastSocket | None) -> None:
        """Write straight to ``socket`` from now on (None: back to the writer task)."""
        self._socket = socket
        wire = socket is not None
        if wire != self.wire:
            self.wire = wire
            if self._outbox:
                # What is queued was framed for the other way out (the connection is new or ending).
                convert = wire_frame if wire else wire_payload
                self._outbox = [convert(frame) for frame in self._outbox]
                self._outbox_bytes = sum(len(frame) for frame in self._outbox)
        if socket is not None and self._outbox:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write every queued frame in one go, if the socket can take them now."""
        self._flush_scheduled = False
        socket = self._socket
        if not self._outbox or self.close_code is not None:
            return
        if socket is None:
            self._wake_writer()  # the writer task's job
            return
        if not socket.writable_now:
            return  # the socket's resume_writing calls us again
        frames, self._outbox = self._outbox, []
        sent, self._outbox_bytes = self._outbox_bytes, 0
        socket.write_wire(frames)
        self.last_sent = self.clock()
        self.metrics.bytes_out.value += sent

    def close(self, code: int, reason: str) -> None:
        """Ask for this connection to end with ``code``; idempotent, callable from any task."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        self._outbox.clear()
        self._outbox_bytes = 0
        self.metrics.closes.labels(code=str(code)).inc()
        self._wake_writer()
        self.stop_reader()

    def bind_reader(self, task: asyncio.Task[None] | None) -> None:
        self._reader = task

    def stop_reader(self) -> None:
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()

    def _wake_writer(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def write_loop(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        wake = self._wake = asyncio.Event()
        bytes_out = self.metrics.bytes_out
        while True:
            if not self._outbox:
                if self.close_code is not None:
                    return
                wake.clear()
                await wake.wait()
                continue
            frames, self._outbox = self._outbox, []  # still counted in _outbox_bytes until sent
            for frame in frames:
                if self.close_code is not None:
                    break  # closing: the rest is dropped, as close() drops the outbox
                await send(frame)
                if self.close_code is None:
                    self._outbox_bytes -= len(frame)
                self.last_sent = self.clock()
                bytes_out.inc(len(frame))
