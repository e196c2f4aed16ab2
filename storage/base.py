"""The document store contract, independent of any database.

Theory of operation
-------------------
A room's document is stored as an optional *snapshot* (one compacted Yjs v1 update) plus a *tail* of
updates appended after it, each a row with an id, author and timestamp.

* ``append`` returns an update's id only once the row is committed: the server awaits it before
  relaying the update to anyone ("durable before relayed"). Backends make this cheap with group
  commit: every append that arrives while a write is in flight goes into the next single transaction.
* Ids are unique, and within a room they increase in append order. A reader never sees a room's row
  ``n`` committed while a row ``m < n`` of that room is still to come: committed ids are a prefix of
  the room's ids. (SQLite gets this from its single writer; a PostgreSQL backend must serialize a
  room's appends, e.g. per-room advisory lock, because sequences do not commit in order.)
* ``compact`` folds the tail into the snapshot and deletes exactly the rows it folded. The snapshot
  remembers the id of the newest folded row (``upto_id``); the tail is every row of the room with a
  larger id, so an update appended while compaction runs survives, and two compactions racing (two
  processes) can neither lose nor duplicate an update.
* ``history`` lists the tail rows with their attribution. Rows folded into the snapshot no longer
  exist as rows, so history only covers updates since the last compaction.
* Failures surface as ``StoreError`` (``StoreClosed`` after ``close``); the database driver's own
  exceptions are the cause (``__cause__``), never the interface.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from types import TracebackType

import pycrdt

# A hard ceiling well above the server's own update limit (the hub rejects big updates earlier, with a
# close code); it stops a bug from writing one row the size of the disk.
MAX_UPDATE_BYTES = 64 * 1024 * 1024
# Room names are keys, not content: bound them so a client-chosen name cannot bloat every row.
MAX_ROOM_NAME_BYTES = 1024
# Upper bound for one history() page.
MAX_HISTORY_LIMIT = 10_000


class StoreError(Exception):
    """Storage failed (unreachable, commit refused, corrupt data). The cause is chained."""


class StoreClosed(StoreError):
    """The store is closed (or was never opened)."""


@dataclass(frozen=True)
class RoomState:
    snapshot: bytes | None  # compacted Yjs v1 update, or None
    updates: list[bytes]  # tail after the snapshot, in append order
    last_id: int  # id of newest update included (0 when none)
    tail_bytes: int  # sum(len(u) for u in updates)


@dataclass(frozen=True)
class StoredUpdate:
    id: int
    room: str
    data: bytes
    author: str | None
    ts: float


class Store(abc.ABC):
    """A durable log of Yjs updates per room, with snapshots. All methods are coroutines.

    Usage: ``store = open_store(url); await store.open()`` ... ``await store.close()``, or
    ``async with open_store(url) as store: ...``.
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Create or migrate the schema and start the writer. Call once before anything else."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Commit everything pending, stop the writer, release connections. Idempotent."""

    @abc.abstractmethod
    async def append(
        self, room: str, update: bytes, *, author: str | None = None, ts: float | None = None
    ) -> int:
        """Store one update and return its id once committed.

        ``ts`` defaults to the current wall-clock time (seconds since the epoch). Raises ValueError
        for an empty or oversized update or a bad room name, StoreError if the commit failed.
        Waits (backpressure) while too many appends are already waiting for their commit.
        """

    @abc.abstractmethod
    async def load(self, room: str) -> RoomState:
        """Snapshot and tail of a room, read consistently. An unknown room is empty, not an error."""

    @abc.abstractmethod
    async def compact(self, room: str) -> bool:
        """Fold the tail into the snapshot; False if there was nothing to fold.

        CPU-heavy for big tails (the updates are applied to a fresh document); callers decide when,
        e.g. from ``RoomState.tail_bytes`` or the number of updates.
        """

    @abc.abstractmethod
    async def history(
        self, room: str, *, after_id: int = 0, limit: int = 1000
    ) -> list[StoredUpdate]:
        """Tail rows with id > after_id, oldest first, at most ``limit`` (<= MAX_HISTORY_LIMIT).

        Only updates not yet folded by ``compact`` are listed.
        """

    @abc.abstractmethod
    async def rooms(self, prefix: str = "") -> list[str]:
        """Names of stored rooms starting with ``prefix``, sorted by code point."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreError if the storage is unreachable or the writer has stopped (readiness)."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Wait until every append issued before this call is committed (or has failed)."""

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def check_append_args(room: str, update: bytes) -> None:
    """The argument checks every backend applies to ``append``."""
    check_room(room)
    if not isinstance(update, bytes):
        raise TypeError(f"update must be bytes, not {type(update).__name__}")
    if not update:
        raise ValueError("empty update")
    if len(update) > MAX_UPDATE_BYTES:
        raise ValueError(f"update of {len(update)} bytes exceeds {MAX_UPDATE_BYTES}")


def check_room(room: str) -> None:
    if not isinstance(room, str):
        raise TypeError(f"room must be str, not {type(room).__name__}")
    if not room:
        raise ValueError("empty room name")
    try:
        size = len(room.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("room name is not valid Unicode (lone surrogate)") from None
    if size > MAX_ROOM_NAME_BYTES:
        raise ValueError(f"room name longer than {MAX_ROOM_NAME_BYTES} bytes")


def fold_updates(snapshot: bytes | None, updates: list[bytes]) -> bytes:
    """One Yjs v1 update holding everything in the snapshot and the updates, nothing lost.

    Applies them to a fresh Doc and encodes it: ``pycrdt.merge_updates`` is superlinear (seconds for
    ~20k small updates), this is ~20x faster. But a Doc drops what it could not integrate -- structs
    whose predecessors are missing and deletions of items it has never seen (possible when a peer
    synced over another channel) -- and ``Doc.get_update()`` leaves them out. So every input is
    checked against the final state vector, and inputs with parts beyond it are merged back in
    verbatim with ``merge_updates`` (rare and small), keeping them until their dependencies arrive.

    Pure CPU; pycrdt holds the GIL per call, so run it in a worker thread (each Doc stays there).
    """
    inputs = ([snapshot] if snapshot is not None else []) + updates
    doc = pycrdt.Doc()
    for update in inputs:
        doc.apply_update(update)
    folded = doc.get_update()
    state = doc.get_state()
    known = _decode_state_vector(state)
    unintegrated = [u for u in inputs if not _covered(pycrdt.get_update(u, state), known)]
    if unintegrated:
        return pycrdt.merge_updates(folded, *unintegrated)
    return folded


def _covered(diff: bytes, known: dict[int, int]) -> bool:
    """Whether an update's diff against the doc's state vector adds nothing the doc lacks.

    The diff keeps structs at or beyond the state vector (none if all were integrated) and the
    update's whole delete set, whose ranges must lie below the state vector to have been applied.
    """
    clients, pos = _read_var_uint(diff, 0)
    if clients != 0:
        return False
    if pos == len(diff):
        return True
    ds_clients, pos = _read_var_uint(diff, pos)
    for _ in range(ds_clients):
        client, pos = _read_var_uint(diff, pos)
        ranges, pos = _read_var_uint(diff, pos)
        for _ in range(ranges):
            clock, pos = _read_var_uint(diff, pos)
            length, pos = _read_var_uint(diff, pos)
            if clock + length > known.get(client, 0):
                return False
    return True


def _decode_state_vector(state: bytes) -> dict[int, int]:
    count, pos = _read_var_uint(state, 0)
    known: dict[int, int] = {}
    for _ in range(count):
        client, pos = _read_var_uint(state, pos)
        clock, pos = _read_var_uint(state, pos)
        known[client] = clock
    return known


def _read_var_uint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise ValueError("varint longer than 10 bytes")
