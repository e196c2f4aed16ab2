"""SQLite document store: the embedded default, one file shared by every server process on a host.

Theory of operation
-------------------
* Two aiosqlite connections: the writer (used by the flusher task and by compaction's short write
  transaction, serialized by ``_write_lock``) and the reader (``load``, ``history``, ``rooms``,
  serialized by ``_read_lock``). WAL lets the reader and other processes read while a write is in
  flight; ``busy_timeout`` makes writers of different processes queue for the file's single write lock.
  Every write transaction is ``BEGIN IMMEDIATE``: it takes the write lock up front, so it waits on
  the busy handler instead of failing half-way when another process wrote first.
* Group commit (``groupcommit.GroupCommitStore``): the flusher writes every queued append (up to
  MAX_BATCH_*) with one ``executemany`` in one ``BEGIN IMMEDIATE`` transaction.
* Ids: ``INTEGER PRIMARY KEY AUTOINCREMENT`` never hands out an id again, even after pruning deleted
  the newest rows (``history_keep=0``), so a room's ids only grow and "tail = rows with id >
  snapshot.upto_id" holds across restarts. With the write lock held, the rows of one ``executemany`` get consecutive ids that end at
  ``last_insert_rowid()``.
* Compaction is optimistic: read snapshot + tail (one read transaction), fold them outside any
  transaction in a worker thread, then in one write transaction replace the snapshot and prune the
  history (keep the newest ``history_keep`` rows with id <= the new upto_id) -- only if the
  snapshot's ``upto_id`` is still the one read, otherwise someone else (another task or process)
  compacted first and we start over. Rows with ids above the folded ones are never touched.
* Metadata (``meta`` table): ``put_meta`` is its own ``BEGIN IMMEDIATE`` transaction on the writer
  connection (between two batches), reads use the reader.
* Failure: a batch whose transaction fails is rolled back and every append in it raises StoreError;
  the flusher carries on, checks its connection before the next batch and reconnects if it is broken.
  If the flusher itself ever stops, everything waiting fails and ``ping`` reports it.

Durability: ``synchronous=FULL`` (default) fsyncs the WAL at every commit, so a committed update
survives a power cut; ``NORMAL`` survives a crash of the process (kill -9) but may lose the last
commits on power loss, for several times the throughput.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from .base import (
    DEFAULT_HISTORY_KEEP,
    MAX_META_KEYS,
    RoomState,
    StoreClosed,
    StoreError,
    StoredUpdate,
    check_history_args,
    check_history_keep,
    check_meta_key,
    check_meta_prefix,
    check_meta_value,
    check_room,
    fold_updates,
    prefix_upper_bound,
)
from .groupcommit import (
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PENDING_BYTES,
    GroupCommitStore,
    Pending,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        # AUTOINCREMENT: ids are never reused (see theory of operation).
        """CREATE TABLE updates (
               id     INTEGER PRIMARY KEY AUTOINCREMENT,
               room   TEXT NOT NULL,
               data   BLOB NOT NULL,
               author TEXT,
               ts     REAL NOT NULL
           )""",
        "CREATE INDEX updates_by_room ON updates (room, id)",
        """CREATE TABLE snapshots (
               room       TEXT PRIMARY KEY,
               data       BLOB NOT NULL,
               upto_id    INTEGER NOT NULL,
               updated_at REAL NOT NULL
           )""",
        "CREATE TABLE rooms (name TEXT PRIMARY KEY, created_at REAL NOT NULL) WITHOUT ROWID",
    ),
    2: (
        """CREATE TABLE meta (
               room       TEXT NOT NULL,
               key        TEXT NOT NULL,
               value      BLOB NOT NULL,
               updated_at REAL NOT NULL,
               PRIMARY KEY (room, key)
           ) WITHOUT ROWID""",
    ),
}

# How long a writer waits for another process's write lock before its commit fails.
DEFAULT_BUSY_TIMEOUT = 5.0
# After a checkpoint the WAL file is truncated to this size, so one burst does not keep its disk space.
WAL_SIZE_LIMIT = 64 * 1024 * 1024
# Compaction retries when another compactor won the race, then leaves the room to the winner.
COMPACT_ATTEMPTS = 3
# Remember this many room names known to be in the rooms table (skips a statement per batch).
KNOWN_ROOMS_CACHE = 100_000

Synchronous = Literal["FULL", "NORMAL"]


class SQLiteStore(GroupCommitStore):
    def __init__(
        self,
        path: str | PathLike[str],
        *,
        synchronous: str = "FULL",
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    ) -> None:
        path = Path(path).expanduser()
        if str(path) in ("", ".") or str(path).startswith(":memory:"):
            raise ValueError("SQLiteStore needs a file path (two connections share it)")
        mode = synchronous.upper()
        if mode not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        if busy_timeout < 0 or max_pending < 1 or max_pending_bytes < 1:
            raise ValueError("busy_timeout must be >= 0, max_pending and max_pending_bytes >= 1")
        self.path = path
        self.synchronous: Synchronous = "FULL" if mode == "FULL" else "NORMAL"
        self.busy_timeout = busy_timeout
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        # Counters for tests and metrics: write transactions of appends, and updates they held.
        self.commits = 0
        self.appended = 0

        self._state: Literal["new", "open", "closing", "closed"] = "new"
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._writer_suspect = False
        self._reader_suspect = False
        self._closed = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()
        self._pending: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()  # replaced and set after every batch (a pulse)
        self._enqueued = 0  # appends queued so far
        self._resolved = 0  # appends committed or failed so far (in queue order)
        self._outstanding_bytes = 0
        self._known_rooms: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<SQLiteStore {str(self.path)!r} {self._state}>"

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._state != "new":
            raise StoreError(f"{self!r} cannot be opened again")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = await self._connect()
            await self._migrate(self._writer)
            self._reader = await self._connect(read_only=True)
        except (OSError, sqlite3.Error) as exc:
            await self._close_connections()
            raise StoreError(f"cannot open SQLite store {str(self.path)!r}: {exc}") from exc
        except BaseException:
            await self._close_connections()
            raise
        self._state = "open"
        self._flusher = asyncio.create_task(self._flush_forever(), name=f"flusher {self.path}")

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
            async with self._write_lock, self._read_lock:
                await self._close_connections()
            self._state = "closed"
            self._closed.set()

    async def _connect(self, *, read_only: bool = False) -> aiosqlite.Connection:
        # isolation_level=None: no implicit transactions; every transaction here is explicit.
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            async with db.execute("PRAGMA journal_mode = WAL") as cursor:
                row = await cursor.fetchone()
            if row is None or str(row[0]).lower() != "wal":
                raise StoreError(f"{str(self.path)!r} cannot use WAL (journal_mode={row})")
            await db.execute(f"PRAGMA synchronous = {self.synchronous}")
            await db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            if read_only:
                await db.execute("PRAGMA query_only = ON")
        except BaseException:
            await db.close()
            raise
        return db

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        # Under the write lock: processes starting together migrate one after the other.
        await db.execute("BEGIN IMMEDIATE")
        try:
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = list(await db.execute_fetchall("SELECT version FROM schema_version"))
            current = int(rows[0][0]) if rows else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"{str(self.path)!r} has schema version {current}; "
                    f"this code knows up to {SCHEMA_VERSION}"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    await db.execute(statement)
            if not rows:
                await db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif current != SCHEMA_VERSION:
                await db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            await db.execute("COMMIT")
        except BaseException:
            await _rollback(db)
            raise

    async def _close_connections(self) -> None:
        for db in (self._writer, self._reader):
            if db is not None:
                await _close_quietly(db)
        self._writer = self._reader = None

    # -- appends and the flusher -------------------------------------------------------------

    async def append(
        self, room: str, update: bytes, *, author: str | None = None, ts: float | None = None
    ) -> int:
        check_append_args(room, update)
        self._check_open()
        while not self._has_room_for(len(update)):
            await self._progress.wait()
            self._check_open()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(
            _Pending(room, update, author, time.time() if ts is None else float(ts), future)
        )
        self._enqueued += 1
        self._outstanding_bytes += len(update)
        self._wakeup.set()
        return await future

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

    async def _flush_forever(self) -> None:
        try:
            while True:
                if not self._pending:
                    if self._state != "open":
                        return  # closing and drained
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                await self._commit(self._take_batch())
        except asyncio.CancelledError:
            log.warning("SQLite flusher for %s cancelled before close()", self.path)
            raise
        except BaseException:
            log.exception("SQLite flusher for %s stopped", self.path)
            raise
        finally:
            # Whatever the reason we stop, nobody may wait forever for a commit.
            leftover = list(self._pending)
            self._pending.clear()
            self._fail(leftover, lambda: StoreClosed("the store's writer stopped"))

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        size = 0
        while self._pending and len(batch) < MAX_BATCH_UPDATES:
            item = self._pending[0]
            if batch and size + len(item.data) > MAX_BATCH_BYTES:
                break
            batch.append(self._pending.popleft())
            size += len(item.data)
        return batch

    async def _commit(self, batch: list[_Pending]) -> None:
        rows = [(p.room, p.data, p.author, p.ts) for p in batch]
        new_rooms = {p.room for p in batch} - self._known_rooms
        try:
            async with self._write_lock:
                db = await self._writable()
                try:
                    await db.execute("BEGIN IMMEDIATE")
                    cursor = await db.executemany(
                        "INSERT INTO updates (room, data, author, ts) VALUES (?, ?, ?, ?)", rows
                    )
                    if cursor.rowcount != len(rows):
                        raise StoreError(f"inserted {cursor.rowcount} rows of {len(rows)}")
                    async with db.execute("SELECT last_insert_rowid()") as cursor:
                        row = await cursor.fetchone()
                    assert row is not None
                    last_id = int(row[0])
                    if new_rooms:
                        now = time.time()
                        await db.executemany(
                            "INSERT OR IGNORE INTO rooms (name, created_at) VALUES (?, ?)",
                            [(name, now) for name in sorted(new_rooms)],
                        )
                    await db.execute("COMMIT")
                except BaseException:
                    await _rollback(db)
                    raise
        except Exception as exc:
            self._writer_suspect = True
            log.warning("SQLite commit of %d updates failed: %r", len(batch), exc)
            self._fail(batch, lambda: _chained(StoreError(f"commit failed: {exc}"), exc))
            return
        except BaseException as exc:  # cancelled: the store is being torn down
            self._fail(batch, lambda: _chained(StoreClosed("the store's writer stopped"), exc))
            raise
        self.commits += 1
        self.appended += len(batch)
        if len(self._known_rooms) + len(new_rooms) > KNOWN_ROOMS_CACHE:
            self._known_rooms.clear()
        self._known_rooms |= new_rooms
        first_id = last_id - len(batch) + 1
        for offset, pending in enumerate(batch):
            if not pending.future.done():  # its appender may have been cancelled
                pending.future.set_result(first_id + offset)
        self._resolved_batch(batch)

    def _fail(self, batch: list[_Pending], error: Callable[[], StoreError]) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error())  # one instance each: tracebacks differ
        self._resolved_batch(batch)

    def _resolved_batch(self, batch: list[_Pending]) -> None:
        self._outstanding_bytes -= sum(len(p.data) for p in batch)
        self._resolved += len(batch)
        self._pulse()

    async def _writable(self) -> aiosqlite.Connection:
        """The writer connection; after a failed write, checked and reconnected if broken."""
        if self._state == "closed":
            raise StoreClosed(f"{self!r} is closed")
        if self._writer is not None and self._writer_suspect:
            try:
                await self._writer.execute_fetchall("SELECT 1")
            except Exception:
                log.warning("reconnecting the SQLite writer of %s", self.path)
                broken, self._writer = self._writer, None
                await _close_quietly(broken)
        if self._writer is None:
            self._writer = await self._connect()
        self._writer_suspect = False
        return self._writer

    # -- reads -------------------------------------------------------------------------------

    async def load(self, room: str) -> RoomState:
        check_room(room)
        snapshot, upto_id, tail = await self._read_room(room)
        updates = [data for _, data in tail]
        return RoomState(
            snapshot=snapshot,
            updates=updates,
            last_id=tail[-1][0] if tail else upto_id,
            tail_bytes=sum(len(u) for u in updates),
        )

    async def _read_room(self, room: str) -> tuple[bytes | None, int, list[tuple[int, bytes]]]:
        """Snapshot, its upto_id and the tail rows (id, data), from one read transaction."""
        async with self._reading() as db:
            try:
                await db.execute("BEGIN")
                snapshot, upto_id = await _read_snapshot(db, room)
                rows = await db.execute_fetchall(
                    "SELECT id, data FROM updates WHERE room = ? AND id > ? ORDER BY id",
                    (room, upto_id),
                )
            finally:
                await _rollback(db)  # ends the read transaction
        return snapshot, upto_id, [(int(i), bytes(d)) for i, d in rows]

    async def history(
        self, room: str, *, after_id: int = 0, limit: int = 1000
    ) -> list[StoredUpdate]:
        check_room(room)
        if not 1 <= limit <= MAX_HISTORY_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_HISTORY_LIMIT}")
        async with self._reading() as db:
            rows = await db.execute_fetchall(
                "SELECT id, data, author, ts FROM updates WHERE room = ? AND id > ? "
                "ORDER BY id LIMIT ?",
                (room, max(0, after_id), limit),
            )
        return [
            StoredUpdate(id=int(i), room=room, data=bytes(d), author=a, ts=float(t))
            for i, d, a, t in rows
        ]

    async def rooms(self, prefix: str = "") -> list[str]:
        names: list[str] = []
        async with self._reading() as db:
            # BINARY collation orders UTF-8 by code point, so names with the prefix are contiguous.
            async with db.execute(
                "SELECT name FROM rooms WHERE name >= ? ORDER BY name", (prefix,)
            ) as cursor:
                async for (name,) in cursor:
                    if not name.startswith(prefix):
                        break
                    names.append(name)
        return names

    async def ping(self) -> None:
        async with self._reading() as db:
            await db.execute_fetchall("SELECT 1")
        if self._flusher is None or self._flusher.done():
            raise StoreError("the store's writer stopped")
        if self._writer_suspect:  # the last commit failed: is the database writable again?
            try:
                async with self._write_lock:
                    await self._writable()
            except (sqlite3.Error, ValueError, OSError) as exc:
                raise StoreError(f"SQLite writer unavailable: {exc}") from exc

    def _reading(self) -> _Reading:
        self._check_open()
        return _Reading(self)

    def _check_open(self) -> None:
        if self._state != "open":
            raise StoreClosed(f"{self!r} is not open")
        if self._flusher is not None and self._flusher.done():
            raise StoreError("the store's writer stopped")

    # -- compaction --------------------------------------------------------------------------

    async def compact(self, room: str) -> bool:
        check_room(room)
        for _ in range(COMPACT_ATTEMPTS):
            snapshot, upto_id, tail = await self._read_room(room)
            if not tail:
                return False
            new_upto_id = tail[-1][0]
            try:
                folded = await asyncio.to_thread(fold_updates, snapshot, [d for _, d in tail])
            except Exception as exc:  # pycrdt refused a stored update: leave the rows alone
                raise StoreError(f"cannot fold room {room!r}: {exc}") from exc
            if await self._replace_snapshot(room, folded, upto_id, new_upto_id):
                return True
        return False

    async def _replace_snapshot(
        self, room: str, folded: bytes, expected_upto_id: int, new_upto_id: int
    ) -> bool:
        self._check_open()
        try:
            async with self._write_lock:
                db = await self._writable()
                try:
                    await db.execute("BEGIN IMMEDIATE")
                    _, current = await _read_snapshot(db, room, with_data=False)
                    if current != expected_upto_id:
                        await _rollback(db)
                        return False
                    await db.execute(
                        "INSERT INTO snapshots (room, data, upto_id, updated_at) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT (room) DO UPDATE SET "
                        "data = excluded.data, upto_id = excluded.upto_id, "
                        "updated_at = excluded.updated_at",
                        (room, folded, new_upto_id, time.time()),
                    )
                    await db.execute(
                        "DELETE FROM updates WHERE room = ? AND id <= ?", (room, new_upto_id)
                    )
                    await db.execute("COMMIT")
                    return True
                except BaseException:
                    await _rollback(db)
                    raise
        except (sqlite3.Error, ValueError) as exc:
            self._writer_suspect = True
            raise StoreError(f"compaction of {room!r} failed: {exc}") from exc


class _Reading:
    """``async with`` the reader connection: serialized, errors become StoreError."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    async def __aenter__(self) -> aiosqlite.Connection:
        store = self._store
        await store._read_lock.acquire()
        try:
            if store._state != "open":
                raise StoreClosed(f"{store!r} is not open")
            if store._reader is not None and store._reader_suspect:
                try:  # the last read failed: is the connection still usable?
                    await store._reader.execute_fetchall("SELECT 1")
                except Exception:
                    log.warning("reconnecting the SQLite reader of %s", store.path)
                    broken, store._reader = store._reader, None
                    await _close_quietly(broken)
            if store._reader is None:
                store._reader = await store._connect(read_only=True)
            store._reader_suspect = False
            return store._reader
        except (sqlite3.Error, ValueError, OSError) as exc:
            store._read_lock.release()
            raise StoreError(f"SQLite reader unavailable: {exc}") from exc
        except BaseException:
            store._read_lock.release()
            raise

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        store = self._store
        store._read_lock.release()
        # aiosqlite raises ValueError for a closed connection (UnicodeError: a bad argument).
        if isinstance(exc, (sqlite3.Error, ValueError)) and not isinstance(exc, UnicodeError):
            store._reader_suspect = True
            raise StoreError(f"SQLite read failed: {exc}") from exc


async def _read_snapshot(
    db: aiosqlite.Connection, room: str, *, with_data: bool = True
) -> tuple[bytes | None, int]:
    columns = "data, upto_id" if with_data else "NULL, upto_id"
    async with db.execute(f"SELECT {columns} FROM snapshots WHERE room = ?", (room,)) as cursor:
        row = await cursor.fetchone()
    if row is None:
        return None, 0
    return (bytes(row[0]) if row[0] is not None else None), int(row[1])


def _chained(error: StoreError, cause: BaseException) -> StoreError:
    error.__cause__ = cause
    return error


async def _close_quietly(db: aiosqlite.Connection) -> None:
    try:
        await db.close()
    except Exception:  # already broken: nothing left to release
        log.debug("closing a broken SQLite connection failed", exc_info=True)


async def _rollback(db: aiosqlite.Connection) -> None:
    """End the current transaction, if any; never raises (the connection may be broken)."""
    try:
        await db.execute("ROLLBACK")
    except Exception:
        pass
