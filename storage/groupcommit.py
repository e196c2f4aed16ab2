"""Group commit, shared by the backends: the append queue, its flusher task, backpressure, close.

A backend subclasses ``GroupCommitStore`` and supplies ``_open_backend`` / ``_close_backend`` and
``_write_batch`` (write a batch in ONE transaction and return its ids in batch order, or raise).

* ``append`` queues (row, future); if nothing is being written, the next batch -- everything
  queued, up to MAX_BATCH_* -- starts at once, in one transaction, and its futures are resolved
  after COMMIT. Appends that arrive meanwhile form the next batch. A lone append pays one commit
  at once; a crowd arriving together shares the commit after the first one's.
* Starting a batch: a backend that can begin a write without awaiting (``_can_start_write`` /
  ``_start_write``, SQLite's thread queue) is handed the batch directly from ``append`` or from
  the previous batch's completion callback; otherwise, or when it cannot right now, the flusher
  task writes it with ``_write_batch``. On a busy loop each task wake-up costs a whole loop
  iteration, and the direct path skips two per commit (the flusher's wake-up on an append, and
  its resumption after the write). Either way one batch is written at a time.
* Pacing: under load — the previous batch held ``PACE_FROM`` or more appends — transactions
  start at most once per ``commit_interval`` (2 ms by default); a small batch ready sooner waits
  out the rest of the interval (at least ``PACE_MIN_WAIT``). Each commit costs a sync of the log
  (fsync for SQLite, a WAL flush for PostgreSQL) whatever its size, so a busy server doing fewer,
  larger commits spends far less CPU per update (measured: 750 → 430 commits/s at 7,000
  updates/s, 6% less server CPU). Light load (batches of one or two) is never delayed, nor is an
  append after a quiet spell or a batch of ``PACE_BELOW`` or more.
* Backpressure: appends wait (before queueing) while ``max_pending`` updates or ``max_pending_bytes``
  are queued or being written, so a slow database slows producers instead of growing memory. An
  ``append_rows`` of more than that starts writing its first rows before it waits for room.
* A batch whose transaction fails fails every append in it with StoreError (cause chained); the
  flusher carries on with the next batch, the backend reconnecting as needed. If the flusher itself
  ever stops, everything waiting fails and ``ping`` reports it.
* ``close`` refuses new appends, lets the flusher drain the queue, then closes the backend.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Literal

from .base import Store, StoreClosed, StoreError, check_append_args, check_author, check_room, check_update

log = logging.getLogger(__name__)

# One transaction holds at most this many updates / bytes, so a backlog is written in bounded steps
# and a single commit never needs an unbounded amount of memory or WAL.
MAX_BATCH_UPDATES = 1000
MAX_BATCH_BYTES = 16 * 1024 * 1024
# Pacing (see above): the default minimum time between two commits' starts, and the batch size from
# which a batch is written without waiting.
DEFAULT_COMMIT_INTERVAL = 0.002
PACE_FROM = 4
PACE_BELOW = 256
# The shortest wait: uvloop's clock and timers count whole milliseconds. ``call_later(0.0003)``
# fires on the next loop iteration and ``loop.time()`` stands still until the millisecond turns,
# so a sub-millisecond rest of the interval re-armed the timer on every iteration: the event loop
# spun (~15,000 timer callbacks/s at 10,000 updates/s, ~8% of the event loop's CPU).
PACE_MIN_WAIT = 0.001
# Backpressure defaults (see above).
DEFAULT_MAX_PENDING = 10_000
DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024


class _Group:
    """One ``append_rows`` call: a single future for all its updates, resolved with their ids
    once the last of them is committed (a batch of hundreds costs one future, not hundreds)."""

    __slots__ = ("future", "ids", "left")

    def __init__(self, future: asyncio.Future[list[int]], size: int) -> None:
        self.future = future
        self.ids = [0] * size
        self.left = size


@dataclass(slots=True)
class Pending:
    room: str
    data: bytes
    author: str | None
    ts: float
    future: asyncio.Future[int] | None  # an ``append``'s own; None for an ``append_rows``'s
    group: _Group | None = None
    index: int = 0


class GroupCommitStore(Store):
    def __init__(self, *, max_pending: int, max_pending_bytes: int,
                 commit_interval: float = DEFAULT_COMMIT_INTERVAL) -> None:
        if max_pending < 1 or max_pending_bytes < 1:
            raise ValueError("max_pending and max_pending_bytes must be >= 1")
        if not 0 <= commit_interval <= 1:
            raise ValueError("commit_interval must be between 0 and 1 second")
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.commit_interval = commit_interval
        self._last_start = float("-inf")  # loop time the latest transaction started
        self._last_size = 0  # appends in the latest transaction
        # Counters for tests and metrics: write transactions of appends, and updates they held.
        self.commits = 0
        self.appended = 0

        self._state: Literal["new", "open", "closing", "closed"] = "new"
        self._closed = asyncio.Event()
        self._pending: deque[Pending] = deque()
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()  # replaced and set after every batch (a pulse)
        self._enqueued = 0  # appends queued so far
        self._resolved = 0  # appends committed or failed so far (in queue order)
        self._outstanding_bytes = 0
        self._flusher: asyncio.Task[None] | None = None
        self._writing = False  # a batch is being written (by the flusher or a direct start)
        self._kick_timer: asyncio.TimerHandle | None = None

    # -- what a backend provides -----------------------------------------------------------

    @abc.abstractmethod
    async def _open_backend(self) -> None:
        """Connect and migrate; raise StoreError (cause chained) on failure, leaving nothing open."""

    @abc.abstractmethod
    async def _close_backend(self) -> None:
        """Release every connection. Called once, after the flusher drained. Never raises."""

    @abc.abstractmethod
    async def _write_batch(self, batch: list[Pending]) -> list[int]:
        """Insert the batch in one transaction; the ids, in batch order, after COMMIT."""

    def _write_failed(self, exc: BaseException) -> None:  # noqa: B027 - optional hook
        """A batch failed with ``exc``: e.g. mark the connection for a health check."""

    def _can_start_write(self) -> bool:
        """Optional fast path: can ``_start_write`` take a batch right now? (No by default.)"""
        return False

    def _start_write(self, batch: list[Pending], done: Callable[[list[int] | None, BaseException | None], None]) -> None:
        """Fast path: begin writing ``batch`` as ``_write_batch`` would, without awaiting, and call
        ``done(ids, None)`` or ``done(None, error)`` on the event loop when finished. Only called
        right after ``_can_start_write`` said yes."""
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._state != "new":
            raise StoreError(f"{self!r} cannot be opened again")
        await self._open_backend()
        self._state = "open"
        self._flusher = asyncio.create_task(self._flush_forever(), name=f"flusher {self!r}")

    async def close(self) -> None:
        if self._state == "new":
            self._state = "closed"
            self._closed.set()
        if self._state in ("closing", "closed"):
            await self._closed.wait()
            return
        self._state = "closing"
        self._wakeup.set()
        self._pulse()  # appends waiting for room give up
        try:
            if self._flusher is not None:
                await asyncio.wait([self._flusher])  # drains the queue, then returns
        finally:
            try:
                await self._close_backend()
            finally:
                self._state = "closed"
                self._closed.set()

    def _check_open(self) -> None:
        if self._state != "open":
            raise StoreClosed(f"{self!r} is not open")
        if self._flusher is not None and self._flusher.done():
            raise StoreError("the store's writer stopped")

    def _check_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            raise StoreError("the store's writer stopped")

    # -- appends and the flusher -------------------------------------------------------------

    async def append(
        self, room: str, update: bytes, *, author: str | None = None, ts: float | None = None
    ) -> int:
        check_append_args(room, update, author)
        stamp = time.time() if ts is None else float(ts)
        self._check_open()
        while not self._has_room_for(len(update)):
            await self._progress.wait()
            self._check_open()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(Pending(room, update, author, stamp, future))
        self._enqueued += 1
        self._outstanding_bytes += len(update)
        self._kick()
        return await future

    async def append_rows(
        self, rows: list[tuple[str, bytes, str | None]], *, ts: float | None = None
    ) -> list[int]:
        """Queue updates of any rooms at once; same guarantees as ``append`` for each, and their
        ids are in list order. One future for the whole call and no task: cheap on the hot path
        (the hub's writer hands over every room's updates of a round in one call). Every row is
        checked before any is queued; a room or author once per run of the same one."""
        stamp = time.time() if ts is None else float(ts)
        room_checked: object = object()
        author_checked: object = object()
        for room, update, author in rows:
            if room is not room_checked:
                check_room(room)
                room_checked = room
            check_update(update)
            if author is not author_checked:
                check_author(author)
                author_checked = author
        self._check_open()
        if not rows:
            return []
        group = _Group(asyncio.get_running_loop().create_future(), len(rows))
        for index, (room, update, author) in enumerate(rows):
            while not self._has_room_for(len(update)):
                # Room comes only from writing what is queued -- this call's rows included, which
                # nothing else would start (a round after a slow commit can hold more updates
                # than max_pending: without this it waited for room forever).
                self._kick()
                await self._progress.wait()
                self._check_open()
            self._pending.append(Pending(room, update, author, stamp, None, group, index))
            self._enqueued += 1
            self._outstanding_bytes += len(update)
        self._kick()
        return await group.future

    async def flush(self) -> None:
        target = self._enqueued
        while self._resolved < target:
            await self._progress.wait()

    def _has_room_for(self, size: int) -> bool:
        outstanding = self._enqueued - self._resolved
        if outstanding == 0:
            return True  # an oversized update alone still goes through
        return (
            outstanding < self.max_pending
            and self._outstanding_bytes + size <= self.max_pending_bytes
        )

    def _pulse(self) -> None:
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()

    def _kick(self) -> None:
        """Appends are queued: start the next batch now if nothing is being written and pacing
        allows, directly if the backend can (no task hop: on a busy loop every hop is a wait of a
        whole loop iteration), else by waking the flusher task."""
        if self._writing or not self._pending:
            return
        if self._state != "open":
            self._wakeup.set()
            return
        loop = asyncio.get_running_loop()
        wait = self._pace_wait(loop)
        if wait > 0:
            if self._kick_timer is None:
                self._kick_timer = loop.call_later(wait, self._kicked_by_timer)
            return
        if not self._can_start_write():
            self._wakeup.set()
            return
        batch = self._begin_batch(loop)
        self._start_write(batch, lambda ids, exc: self._written(batch, ids, exc))

    def _kicked_by_timer(self) -> None:
        self._kick_timer = None
        self._kick()

    def _written(self, batch: list[Pending], ids: list[int] | None, exc: BaseException | None) -> None:
        """A direct start's batch is written (``ids``) or failed (``exc``); start the next one."""
        self._writing = False
        self._finish(batch, ids, exc)
        if self._state == "open":
            self._kick()
        else:
            self._wakeup.set()  # the flusher drains and returns

    async def _flush_forever(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._writing or not self._pending:
                    if self._state != "open" and not self._writing and not self._pending:
                        return  # closing and drained
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                await self._pace()
                if self._writing:
                    continue  # a direct start took it meanwhile
                batch = self._begin_batch(loop)
                try:
                    await self._commit(batch)
                finally:
                    self._writing = False
                self._kick()
        except asyncio.CancelledError:
            log.warning("flusher of %r cancelled before close()", self)
            raise
        except BaseException:
            log.exception("flusher of %r stopped", self)
            raise
        finally:
            # Whatever the reason we stop, nobody may wait forever for a commit.
            leftover = list(self._pending)
            self._pending.clear()
            self._fail(leftover, lambda: StoreClosed("the store's writer stopped"))

    def _pace_wait(self, loop: asyncio.AbstractEventLoop) -> float:
        """How long the next batch should wait: the rest of the commit interval (at least
        ``PACE_MIN_WAIT``) if the last batch was big enough to pace and this one is still small;
        0 otherwise (and when closing)."""
        if self._last_size < PACE_FROM or len(self._pending) >= PACE_BELOW or self._state != "open":
            return 0.0
        wait = self._last_start + self.commit_interval - loop.time()
        return max(wait, PACE_MIN_WAIT) if wait > 0 else 0.0

    async def _pace(self) -> None:
        wait = self._pace_wait(asyncio.get_running_loop())
        if wait > 0:
            await asyncio.sleep(wait)

    def _begin_batch(self, loop: asyncio.AbstractEventLoop) -> list[Pending]:
        self._writing = True
        self._last_start = loop.time()
        batch = self._take_batch()
        self._last_size = len(batch)
        return batch

    def _take_batch(self) -> list[Pending]:
        batch: list[Pending] = []
        size = 0
        while self._pending and len(batch) < MAX_BATCH_UPDATES:
            item = self._pending[0]
            if batch and size + len(item.data) > MAX_BATCH_BYTES:
                break
            batch.append(self._pending.popleft())
            size += len(item.data)
        return batch

    async def _commit(self, batch: list[Pending]) -> None:
        try:
            ids = await self._write_batch(batch)
        except Exception as exc:
            self._finish(batch, None, exc)
            return
        except BaseException as exc:  # cancelled: the store is being torn down
            self._fail(batch, lambda: chained(StoreClosed("the store's writer stopped"), exc))
            raise
        self._finish(batch, ids, None)

    def _finish(self, batch: list[Pending], ids: list[int] | None, exc: BaseException | None) -> None:
        """Resolve a written batch's appends with their ids, or fail them all with ``exc``."""
        if exc is None and (ids is None or len(ids) != len(batch)):
            exc = StoreError(f"stored {0 if ids is None else len(ids)} rows of {len(batch)}")
        if exc is not None:
            error = exc  # a name the lambda can close over with its narrowed type
            self._write_failed(error)
            log.warning("commit of %d updates failed: %r", len(batch), error)
            self._fail(batch, lambda: chained(StoreError(f"commit failed: {error}"), error))
            return
        assert ids is not None
        self.commits += 1
        self.appended += len(batch)
        for pending, update_id in zip(batch, ids):
            group = pending.group
            if group is None:
                if not pending.future.done():  # its appender may have been cancelled
                    pending.future.set_result(update_id)
                continue
            group.ids[pending.index] = update_id
            group.left -= 1
            if group.left == 0 and not group.future.done():
                group.future.set_result(group.ids)
        self._resolved_batch(batch)

    def _fail(self, batch: list[Pending], error: Callable[[], StoreError]) -> None:
        for pending in batch:
            future = pending.future if pending.group is None else pending.group.future
            if not future.done():
                future.set_exception(error())  # one instance each: tracebacks differ
        self._resolved_batch(batch)

    def _resolved_batch(self, batch: list[Pending]) -> None:
        self._outstanding_bytes -= sum(len(p.data) for p in batch)
        self._resolved += len(batch)
        self._pulse()


def chained(error: StoreError, cause: BaseException) -> StoreError:
    error.__cause__ = cause
    return error
