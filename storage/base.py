"""The document store contract, independent of any database.

Theory of operation
-------------------
A room's document is stored as an optional *snapshot* (one compacted Yjs v1 update) plus a *log* of
updates, each a row with an id, author and timestamp. The snapshot remembers the id of the newest row
it holds (``upto_id``); the room's *tail* is every row with a larger id. ``load`` returns snapshot +
tail, so its cost is bounded by how often the room is compacted, not by the room's age.

* ``append`` returns an update's id only once the row is committed: the server awaits it before
  relaying the update to anyone ("durable before relayed"). Backends make this cheap with group
  commit: every append that arrives while a write is in flight goes into the next single transaction
  (``commits`` counts those transactions, ``appended`` the updates they held).
* Ids are unique across the store, and within a room they increase in append order. A reader never
  sees a room's row ``n`` committed while a row ``m < n`` of that room is still to come: committed ids
  are a prefix of the room's ids. (SQLite gets this from its single writer; PostgreSQL serializes a
  room's appends with a per-room advisory lock, because sequences do not commit in order.) So "every
  row with id > x" never misses a row that commits later, which is what ``load``, compaction and
  ``history(after_id=...)`` paging rely on.
* ``compact`` folds the tail into a new snapshot and moves ``upto_id`` to the newest folded row. The
  folded rows are KEPT as history (attribution for per-user undo, audit, replay): they leave ``load``
  but not ``history``. An update appended while compaction runs has a larger id, so it stays in the
  tail. Compaction writes only if the snapshot's ``upto_id`` is still the one it read, so two racing
  compactions (two tasks, processes or hosts) can neither lose nor duplicate an update; PostgreSQL
  also lets only one node compact a room at a time (advisory try-lock: the loser returns False).
  Folding keeps parts a Doc could not integrate yet (see ``fold_updates``). Each store keeps the
  Doc of a room's last fold (``FoldCache``), so compacting the room again only applies the new tail.
* Retention: the same compaction prunes history, keeping the newest ``history_keep`` rows at or below
  the new ``upto_id`` (default ``DEFAULT_HISTORY_KEEP``; 0 deletes every folded row). Pruning only
  ever deletes rows already inside the snapshot (id <= upto_id): the tail is never touched. A room
  therefore holds at most ``history_keep`` + tail rows.
* ``history`` lists rows (retained and tail) in id order with their attribution; ``after_id`` /
  ``before_id`` (both exclusive) page through it, ``author`` filters.
* Metadata: a small key/value map per room (``get_meta`` / ``put_meta`` / ``list_meta``) for services
  (undo stacks, room owner, invites). Each ``put_meta`` is its own durable transaction, independent
  of the update log and of group commit. Keys, values and keys per room are bounded (``MAX_META_*``).
* Chat: messages, mentions and known users per room (``chat_*``; see ``storage.chat``), in tables
  of their own, each write its own durable transaction.
* Storage failures surface as ``StoreError`` (``StoreClosed`` once closed) with the driver's own
  exception as ``__cause__``: callers never need to know the database. Bad arguments raise
  ValueError/TypeError before anything is queued, so one bad append can never fail a whole batch.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import pycrdt

if TYPE_CHECKING:
    from .chat import ChatMention, ChatMessage

# A hard ceiling well above the server's own update limit (the hub rejects big updates earlier, with a
# close code); it stops a bug from writing one row the size of the disk.
MAX_UPDATE_BYTES = 64 * 1024 * 1024
# Room names are keys, not content: bound them so a client-chosen name cannot bloat every row.
MAX_ROOM_NAME_BYTES = 1024
# Authors are server-stamped user ids; bounded like room names.
MAX_AUTHOR_BYTES = 1024
# Upper bound for one history() page.
MAX_HISTORY_LIMIT = 10_000
# Rows kept per room beyond the snapshot, by default (see "Retention").
DEFAULT_HISTORY_KEEP = 20_000
# Metadata bounds: key size (UTF-8 bytes), value size, and distinct keys per room.
MAX_META_KEY_BYTES = 256
MAX_META_VALUE_BYTES = 1024 * 1024
MAX_META_KEYS = 10_000
# A room as a backend reads it for a load or a fold: its snapshot (or None), the snapshot's
# upto_id, and the tail rows above it as (id, data).
RoomRead = tuple[bytes | None, int, list[tuple[int, bytes]]]


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
    ``async with open_store(url) as store: ...``. Every backend takes the keyword option
    ``history_keep`` (rows kept per room beyond the snapshot, see "Retention").
    """

    # Group-commit metrics, kept by every backend: transactions that committed appends, and the
    # appends they held (appended / commits = average batch size).
    commits: int = 0
    appended: int = 0

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
        for an empty or oversized update, a bad room name or author (empty, NUL, lone surrogate,
        too long), StoreError if the commit failed.
        Waits (backpressure) while too many appends are already waiting for their commit.
        """

    async def append_many(
        self, room: str, updates: list[tuple[bytes, str | None]], *, ts: float | None = None
    ) -> list[int]:
        """Append several ``(update, author)`` pairs of one room; ids in list order, each durable
        when this returns: ``append_rows`` for one room."""
        return await self.append_rows([(room, update, author) for update, author in updates], ts=ts)

    async def append_rows(
        self, rows: list[tuple[str, bytes, str | None]], *, ts: float | None = None
    ) -> list[int]:
        """Append ``(room, update, author)`` rows of any rooms; ids in list order, each durable
        when this returns. Every row is checked before any is queued: a ValueError means nothing
        was stored. Backends with group commit override this to skip per-update tasks."""
        return list(await asyncio.gather(*(self.append(r, u, author=a, ts=ts) for r, u, a in rows)))

    @abc.abstractmethod
    async def load(self, room: str) -> RoomState:
        """Snapshot and tail of a room, read consistently. An unknown room is empty, not an error."""

    @abc.abstractmethod
    async def compact(self, room: str) -> bool:
        """Fold the tail into the snapshot, keep the rows as history, prune beyond history_keep.

        False if there was nothing to fold, or another compactor (node) got there first.
        CPU-heavy for big tails (the updates are applied to a fresh document); callers decide
        when, e.g. from ``RoomState.tail_bytes`` or the number of updates.
        """

    @abc.abstractmethod
    async def history(
        self,
        room: str,
        *,
        after_id: int = 0,
        before_id: int | None = None,
        limit: int = 1000,
        author: str | None = None,
    ) -> list[StoredUpdate]:
        """Rows with ``after_id < id < before_id`` (and by ``author`` if given), oldest first.

        At most ``limit`` rows (1..MAX_HISTORY_LIMIT). Covers the tail and the rows compaction kept
        (see "Retention"); page on with ``after_id=rows[-1].id``.
        """

    @abc.abstractmethod
    async def get_meta(self, room: str, key: str) -> bytes | None:
        """The value stored under (room, key), or None."""

    @abc.abstractmethod
    async def put_meta(self, room: str, key: str, value: bytes | None) -> None:
        """Store ``value`` under (room, key), durably, before returning; None deletes the key.

        Raises ValueError for a bad key or value, or for a new key when the room already holds
        MAX_META_KEYS keys.
        """

    @abc.abstractmethod
    async def list_meta(self, room: str, prefix: str = "") -> dict[str, bytes]:
        """Every (key, value) of the room whose key starts with ``prefix``, in key order."""

    # -- chat (see storage.chat) ---------------------------------------------------------------

    @abc.abstractmethod
    async def chat_add(self, message: ChatMessage) -> None:
        """Store a new message and a mention row per ``message.mentions``, durably, in one
        transaction. Raises ValueError for bad fields or an id the room already has."""

    @abc.abstractmethod
    async def chat_get(self, room: str, message_id: str) -> ChatMessage | None:
        """One message (or its tombstone), or None."""

    @abc.abstractmethod
    async def chat_history(self, room: str, *, before: str | None = None, limit: int = 50) -> list[ChatMessage]:
        """The newest ``limit`` messages with ``id < before`` (all if None), oldest first.

        Tombstones included. Page back with ``before=page[0].id``; a short page is the last.
        """

    @abc.abstractmethod
    async def chat_edit(self, room: str, message_id: str, text: str, *, mentions: tuple[str, ...] = (),
                        edited_ts: float | None = None) -> ChatMessage | None:
        """Replace a live message's text and mentions (mentions still named keep their read flag).

        None if the message does not exist or is deleted.
        """

    @abc.abstractmethod
    async def chat_delete(self, room: str, message_id: str) -> ChatMessage | None:
        """Tombstone a message: text, anchor, mentions and reactions removed from storage.

        Returns the tombstone (idempotent), None if there is no such message.
        """

    @abc.abstractmethod
    async def chat_react(self, room: str, message_id: str, emoji: str, user: str) -> ChatMessage | None:
        """Toggle ``user``'s ``emoji`` reaction; None if the message does not exist or is deleted."""

    @abc.abstractmethod
    async def chat_mentions(self, user: str, *, unread_only: bool = True, before: str | None = None,
                            limit: int = 100) -> list[ChatMention]:
        """Mentions of ``user`` in every room, newest first (by message id, ``before`` exclusive)."""

    @abc.abstractmethod
    async def chat_mark_read(self, user: str, room: str, upto: str) -> int:
        """Mark ``user``'s mentions in ``room`` with message id <= ``upto`` read; returns how many."""

    async def chat_put_user(self, room: str, user: str, name: str) -> None:
        """Remember ``user`` (display ``name``) as known in ``room`` (for resolving @mentions)."""
        await self.chat_put_users([(room, user, name)])

    @abc.abstractmethod
    async def chat_put_users(self, users: Sequence[tuple[str, str, str]]) -> None:
        """``chat_put_user`` for each (room, user, name), in one transaction (all or none); the
        last entry for a (room, user) wins. Every entry is checked before anything is written."""

    @abc.abstractmethod
    async def chat_users(self, room: str) -> dict[str, str]:
        """Every user known in ``room``: id -> display name."""

    @abc.abstractmethod
    async def rooms(self, prefix: str = "") -> list[str]:
        """Names of rooms with stored updates starting with ``prefix``, sorted by code point.

        Metadata alone does not make a room.
        """

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


def check_append_args(room: str, update: bytes, author: str | None = None) -> None:
    """The argument checks every backend applies to ``append``."""
    check_room(room)
    check_update(update)
    check_author(author)


def check_update(update: bytes) -> None:
    if not isinstance(update, bytes):
        raise TypeError(f"update must be bytes, not {type(update).__name__}")
    if not update:
        raise ValueError("empty update")
    if len(update) > MAX_UPDATE_BYTES:
        raise ValueError(f"update of {len(update)} bytes exceeds {MAX_UPDATE_BYTES}")


def check_author(author: str | None) -> None:
    if author is not None:
        _check_text("author", author, MAX_AUTHOR_BYTES)


def check_room(room: str) -> None:
    _check_text("room name", room, MAX_ROOM_NAME_BYTES)


def check_history_args(
    after_id: int, before_id: int | None, limit: int, author: str | None
) -> None:
    for name, value in (("after_id", after_id), ("before_id", before_id), ("limit", limit)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if not 1 <= limit <= MAX_HISTORY_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_HISTORY_LIMIT}")
    if author is not None:
        _check_text("author", author, MAX_AUTHOR_BYTES)


def check_prefix(prefix: str) -> None:
    """A ``rooms`` prefix: any string a room name could start with ("" for all)."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be str, not {type(prefix).__name__}")
    if prefix:
        _check_text("prefix", prefix, MAX_ROOM_NAME_BYTES)


def check_meta_key(key: str) -> None:
    _check_text("meta key", key, MAX_META_KEY_BYTES)


def check_meta_prefix(prefix: str) -> None:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be str, not {type(prefix).__name__}")
    if prefix:
        check_meta_key(prefix)


def check_meta_value(value: bytes | None) -> None:
    if value is None:
        return
    if not isinstance(value, bytes):
        raise TypeError(f"meta value must be bytes or None, not {type(value).__name__}")
    if len(value) > MAX_META_VALUE_BYTES:
        raise ValueError(f"meta value of {len(value)} bytes exceeds {MAX_META_VALUE_BYTES}")


def check_history_keep(history_keep: int) -> int:
    if not isinstance(history_keep, int) or isinstance(history_keep, bool) or history_keep < 0:
        raise ValueError(f"history_keep must be an int >= 0, not {history_keep!r}")
    return history_keep


def _check_text(what: str, value: str, max_bytes: int) -> None:
    """Non-empty, valid Unicode without NUL (PostgreSQL text cannot hold it), at most max_bytes."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"empty {what}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (lone surrogate)") from None
    if size > max_bytes:
        raise ValueError(f"{what} longer than {max_bytes} bytes")
    if "\0" in value:
        raise ValueError(f"{what} contains NUL")


def prefix_upper_bound(prefix: str) -> str | None:
    """The least string greater than every string starting with ``prefix`` (code point order).

    None when there is none (the prefix is all U+10FFFF). With it, "starts with prefix" becomes the
    index-friendly range ``prefix <= s < bound``.
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:  # surrogates never occur in valid names
                nxt = 0xE000
            return "".join(chars) + chr(nxt)
    return None


def fold_updates(snapshot: bytes | None, updates: list[bytes]) -> bytes:
    """One Yjs v1 update holding everything in the snapshot and the updates, nothing lost.

    Applies them to a fresh Doc and encodes it: ``pycrdt.merge_updates`` of everything is superlinear
    (seconds for ~20k small updates), this is ~20x faster. But a Doc drops what it could not
    integrate -- structs whose predecessors are missing and deletions of items it has never seen
    (possible when a peer synced over another channel) -- and ``Doc.get_update()`` leaves them out.
    So every input is checked against the final state vector, and the parts of it beyond that are
    merged back in verbatim with ``merge_updates`` (rare and small), keeping them until their
    dependencies arrive.

    Pure CPU; pycrdt holds the GIL per call, so run it in a worker thread. ``FoldCache.fold`` does
    the same but reuses the Doc of the room's previous fold instead of decoding its snapshot again.
    """
    return _fold(None, snapshot, updates)[0]


# FoldCache budget per store, in bytes of folded snapshots: a room's Doc takes several times its
# encoded size in memory (~7x for a long plain-text document), so this is ~30 MiB of Docs at most.
DEFAULT_FOLD_CACHE_BYTES = 4 * 1024 * 1024
FOLD_CACHE_ROOMS = 256


class FoldCache:
    """``fold_updates`` that keeps each room's Doc from its last fold, so that compacting the room
    again only applies the new tail instead of decoding the whole snapshot into a fresh Doc.

    A kept Doc is reused only when the snapshot passed in is byte for byte the update that Doc
    produced, so whatever happened meanwhile (another process compacted the room, our write lost
    a race, a restore) simply means a fresh Doc. Only Docs that hold all of their fold are kept (no
    parts merged back), and a Doc is taken out while a fold uses it: a failed fold drops it, two
    folds of one room never share it. Least recently folded rooms go first once the folded bytes
    kept pass ``max_bytes`` (0: keep nothing). Thread-safe: folds run in worker threads.
    """

    def __init__(self, max_bytes: int = DEFAULT_FOLD_CACHE_BYTES, max_rooms: int = FOLD_CACHE_ROOMS) -> None:
        if max_bytes < 0 or max_rooms < 0:
            raise ValueError("max_bytes and max_rooms must be >= 0")
        self.max_bytes = max_bytes
        self.max_rooms = max_rooms
        self.hits = 0
        self.misses = 0
        self._docs: OrderedDict[str, tuple[bytes, pycrdt.Doc]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._docs)

    def fold(self, room: str, snapshot: bytes | None, updates: list[bytes]) -> bytes:
        with self._lock:
            kept = self._docs.pop(room, None)
            if kept is not None:
                self._bytes -= len(kept[0])
            doc = kept[1] if kept is not None and kept[0] == snapshot else None
            if doc is None:
                self.misses += 1
            else:
                self.hits += 1
        folded, doc, whole = _fold(doc, snapshot, updates)
        if whole and len(folded) <= self.max_bytes and self.max_rooms:
            with self._lock:
                previous = self._docs.pop(room, None)  # a concurrent fold of the room finished first
                if previous is not None:
                    self._bytes -= len(previous[0])
                self._docs[room] = (folded, doc)
                self._bytes += len(folded)
                while self._bytes > self.max_bytes or len(self._docs) > self.max_rooms:
                    _, (dropped, _) = self._docs.popitem(last=False)
                    self._bytes -= len(dropped)
        return folded

    def clear(self) -> None:
        with self._lock:
            self._docs.clear()
            self._bytes = 0


# Updates are merged in chunks of this many before they are applied: one apply_update of a merged
# chunk costs about what one of a single update does (a transaction over the whole document),
# and merging is cheap at this size (merge_updates is superlinear only in much larger counts).
FOLD_CHUNK = 64


def _fold(doc: pycrdt.Doc | None, snapshot: bytes | None, updates: list[bytes]) -> tuple[bytes, pycrdt.Doc, bool]:
    """(folded update, the Doc holding it, whether the Doc holds all of it).

    ``doc``, if given, must hold exactly ``snapshot`` with nothing left unintegrated (the Doc of a
    previous clean fold); it is mutated. Otherwise a fresh Doc is made and the snapshot applied.
    """
    inputs: list[bytes] = []  # what must be checked against the final state
    if doc is None:
        doc = pycrdt.Doc()
        if snapshot is not None:
            doc.apply_update(snapshot)
            inputs.append(snapshot)
    for start in range(0, len(updates), FOLD_CHUNK):
        chunk = updates[start:start + FOLD_CHUNK]
        merged = chunk[0] if len(chunk) == 1 else pycrdt.merge_updates(*chunk)
        doc.apply_update(merged)
        inputs.append(merged)
    folded = doc.get_update()
    if not inputs:
        return folded, doc, True
    state = doc.get_state()
    known = _StateSet(state)
    # An input's diff against the final state vector holds its structs the Doc lacks and its whole
    # delete set: exactly what merging the input back would add. Usually nothing.
    leftovers = [diff for diff in (pycrdt.get_update(u, state) for u in inputs) if not known.covers(diff)]
    if leftovers:
        return pycrdt.merge_updates(folded, *leftovers), doc, False
    return folded, doc, True


class _StateSet:
    """The ids below a state vector, to test whether a diff adds anything beyond it."""

    # IdMap.from_set keeps only ranges that carry an attribute; which one does not matter.
    _MARK = [pycrdt.ContentAttribute("deleted", True)]

    def __init__(self, state: bytes) -> None:
        self._state = state
        self._ids: pycrdt.IdSet | None = None

    def covers(self, diff: bytes) -> bool:
        """Whether an update's diff against the state adds nothing: no structs, and a delete set
        whose ranges all lie below the state vector (those deletions have been applied)."""
        if diff[:1] != b"\x00":  # varuint struct-client count: not zero
            return False
        delete_set = diff[1:]
        if delete_set in (b"", b"\x00"):
            return True
        if self._ids is None:
            self._ids = pycrdt.IdSet.decode(_id_set_below(self._state))
        beyond = pycrdt.IdMap.from_set(pycrdt.IdSet.decode(delete_set), self._MARK)
        beyond.diff_with(self._ids)
        return beyond.is_empty()


def _id_set_below(state: bytes) -> bytes:
    """Encode (as a delete set / IdSet) every id below a state vector: one range per client."""
    count, pos = _read_var_uint(state, 0)
    ranges: list[tuple[int, int]] = []
    for _ in range(count):
        client, pos = _read_var_uint(state, pos)
        clock, pos = _read_var_uint(state, pos)
        if clock:
            ranges.append((client, clock))
    out = bytearray()
    _write_var_uint(out, len(ranges))
    for client, clock in ranges:
        for value in (client, 1, 0, clock):  # client, one range, [0, clock)
            _write_var_uint(out, value)
    return bytes(out)


def _read_var_uint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise ValueError("varint longer than 10 bytes")


def _write_var_uint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
