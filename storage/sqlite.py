"""SQLite document store: the embedded default, shared by every server process on a host.

Theory of operation
-------------------
* Two files (schema version 5): the main file (the path given: ``recent``, rooms, metadata, chat)
  and its archive (the same path + ``.archive``: the indexed log ``updates``, the snapshots and
  ``merged``). Each file has its own write lock and WAL, so the archive's big transactions --
  moving rows into the per-room index, compaction -- never hold up a group commit. (In one file
  they did: a move of 2,048 rows took 10 ms at first and 60 ms once the index held 120,000 rows,
  and every update arriving meanwhile waited; p99 at 3,000 updates/s grew from 10 to 50 ms in
  40 s.) Back up both files together.
* Three aiosqlite connections: the writer (the main file: group commits, metadata, chat; serialized
  by ``_write_lock`` and its thread's queue), the maintenance connection (the archive, with the
  main file attached as ``hot`` and only read: merges and compaction, serialized by
  ``_maint_lock``) and the reader (the main file with the archive attached as ``archive``:
  ``load``, ``history``, ``rooms``, chat reads: queued straight onto its thread, see ``_Reading``).
  WAL lets the reader and other processes read while a write is in flight; ``busy_timeout`` makes
  writers of different processes queue for each file's single write lock.
  Every write transaction takes the write lock up front (``BEGIN IMMEDIATE``, or a single write
  statement in autocommit, which takes it at its start), so it waits on the busy handler instead
  of failing half-way when another process wrote first.
* The writer process (``writer="process"``, the server's default; ``storage.sqlite_writer``): the
  group commits run in a child process with a connection of its own, so a commit never waits for
  the GIL of a busy event loop (at 12,500 updates/s: commit 6.2 -> 4.0 ms, p99 78 -> 49 ms). The
  writer connection here keeps everything else (chat, metadata, migrations) and any batch written
  while the child is down; SQLite's write lock orders the two. If the child dies, its batch fails
  like any failed commit and the flusher starts another child (at most every WRITER_PROCESS_RETRY
  seconds if it cannot), writing in-process meanwhile.
* Group commit (``groupcommit.GroupCommitStore``): each batch of queued appends (up to
  MAX_BATCH_*) is one transaction: up to 256 rows to rooms already known is ONE multi-row INSERT
  in autocommit; more rows, or a new room, is ``BEGIN IMMEDIATE`` + INSERTs of up to 256 rows +
  the rooms table. A batch is usually started directly (``_start_write``: the job goes on the
  writer's thread queue and reports back with one ``call_soon_threadsafe``); the flusher task
  writes it instead while ``_write_lock`` is held or the writer needs a check after a failure.
* Recent rows: appends go to ``recent``, a table with no index, so a commit dirties one or two
  table pages whatever the number of rooms in it (with the per-room index of ``updates``, every
  room in a commit dirtied a page of its own: at 5,000 updates/s in 250 rooms, ~50 MB/s of WAL,
  each page written twice, to the WAL and at checkpoint). After every MERGE_ROWS rows it
  appended, a process asks its maintenance connection for a merge: one archive transaction
  copies every row of ``recent`` above ``merged.upto`` into ``updates`` (the rows of many
  commits, so each room's index page is written once for all of them) and raises
  ``merged.upto``; it reads the main file as of its first read of it, and every row there up to
  the largest id it sees is committed (ids follow the main file's write lock). That commit is
  synced (the archive is always ``synchronous=FULL``) before the next group commit deletes the
  copied rows from ``recent`` in its own transaction. Until then the copies are in both files:
  every read skips rows of ``recent`` at or below ``merged.upto``. A failed merge leaves the rows
  where they are and the next one copies them.
* Reads across the files: one read transaction on the reader, ``recent`` read first, then the
  archive. A row the first read saw and a merge then copied and deleted is in the archive the
  second read sees (the copy commits before the delete); a row committed after the first read
  may show up through the archive too -- newer, never missing.
* Thread hops: every aiosqlite await is a trip to the connection's thread and back (an event-loop
  wakeup). The hot transactions -- the flusher's batch, compaction's read and write, ``put_meta``,
  ``load`` -- are therefore each ONE plain function run on the connection's thread (``_in_thread``),
  ending its own transaction (COMMIT, or ROLLBACK on any error) before it returns. The connection's
  lock is held meanwhile, so nothing else runs on that connection in between.
* Ids: ``INTEGER PRIMARY KEY AUTOINCREMENT`` (of ``recent``, which took over the sequence of
  ``updates`` in the migration; moved rows keep their ids) never hands out an id again, even
  after pruning deleted the newest rows (``history_keep=0``), so a room's ids only grow and "tail = rows with id >
  snapshot.upto_id" holds across restarts. With the write lock held, the rows of one transaction get consecutive ids that end at
  the last INSERT's ``lastrowid``.
* Compaction is optimistic and archive-only: on the maintenance connection, read snapshot + tail
  (the archived rows and the room's rows still only in ``recent``; one read transaction); fold
  them outside any transaction in a worker thread; then in one archive write transaction replace
  the snapshot and prune the history (keep the newest ``history_keep`` rows with id <= the new
  upto_id, counting the unarchived ones; only if those alone are more than that is a merge run
  first, in the same transaction) -- only if the snapshot's ``upto_id`` is still the one read, otherwise someone else
  (another task or process) compacted first and we start over. Rows with ids above the folded
  ones are never touched.
* Chat (``chat_*`` tables, schema version 3): each write is its own ``BEGIN IMMEDIATE`` transaction
  on the writer (read-modify-write of reactions is safe under it), reads use the reader.
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
import functools
import logging
import sqlite3
import time
from os import PathLike
from pathlib import Path
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar

import aiosqlite

from .base import (
    DEFAULT_FOLD_CACHE_BYTES,
    DEFAULT_HISTORY_KEEP,
    FoldCache,
    MAX_META_KEYS,
    RoomRead,
    RoomState,
    StoreClosed,
    StoreError,
    StoredUpdate,
    check_history_args,
    check_history_keep,
    check_meta_key,
    check_meta_prefix,
    check_meta_value,
    check_prefix,
    check_room,
    prefix_upper_bound,
)
from .chat import (
    COLUMNS as CHAT_COLUMNS,
    ChatMention,
    ChatMessage,
    check_chat_id,
    check_chat_message,
    check_chat_text,
    check_emoji,
    check_limit,
    check_mentions,
    check_user,
    checked_users,
    dump_mentions,
    dump_reactions,
    from_row,
    to_row,
    toggle_reaction,
)
from .sqlite_writer import (
    WRITER_CACHED_STATEMENTS,
    WriterProcess,
    insert_batch as _insert_batch,
    rollback_quietly as _rollback_sync,
)
from .groupcommit import (
    DEFAULT_COMMIT_INTERVAL,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PENDING_BYTES,
    GroupCommitStore,
    Pending,
)

log = logging.getLogger(__name__)

# The update log's columns: ``updates`` (indexed by room) and ``recent`` (new rows, no index).
_LOG_TABLE = """CREATE TABLE {name} (
               id     INTEGER PRIMARY KEY AUTOINCREMENT,
               room   TEXT NOT NULL,
               data   BLOB NOT NULL,
               author TEXT,
               ts     REAL NOT NULL
           )"""

SCHEMA_VERSION = 5
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        # AUTOINCREMENT: ids are never reused (see theory of operation).
        _LOG_TABLE.format(name="updates"),
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
    3: (
        # Chat (storage.chat). Message ids are server-made sortable strings; BINARY collation
        # orders them bytewise, which is their sort order.
        """CREATE TABLE chat_messages (
               room        TEXT NOT NULL,
               id          TEXT NOT NULL,
               author      TEXT NOT NULL,
               author_name TEXT NOT NULL,
               text        TEXT NOT NULL,
               ts          REAL NOT NULL,
               reply_to    TEXT,
               anchor      TEXT,
               mentions    TEXT NOT NULL DEFAULT '[]',
               reactions   TEXT NOT NULL DEFAULT '{}',
               edited_ts   REAL,
               deleted     INTEGER NOT NULL DEFAULT 0,
               PRIMARY KEY (room, id)
           ) WITHOUT ROWID""",
        """CREATE TABLE chat_mentions (
               user_id    TEXT NOT NULL,
               room       TEXT NOT NULL,
               message_id TEXT NOT NULL,
               read       INTEGER NOT NULL DEFAULT 0,
               PRIMARY KEY (user_id, room, message_id)
           ) WITHOUT ROWID""",
        "CREATE INDEX chat_mentions_by_user ON chat_mentions (user_id, read, message_id)",
        """CREATE TABLE chat_users (
               room      TEXT NOT NULL,
               user_id   TEXT NOT NULL,
               name      TEXT NOT NULL,
               last_seen REAL NOT NULL,
               PRIMARY KEY (room, user_id)
           ) WITHOUT ROWID""",
    ),
    4: (
        # New rows land here, in id order, with no index: a commit writes one or two table pages
        # instead of an index page per room. The writer moves them to ``updates`` in bulk (see
        # "Recent rows" in the theory of operation). Its ids carry on from those of updates.
        _LOG_TABLE.format(name="recent"),  # the same columns as updates
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'recent', seq FROM sqlite_sequence WHERE name = 'updates'",
    ),
    5: (
        # The indexed log and the snapshots live in the archive file now (see "Two files"); their
        # rows were copied there (``_ARCHIVE_COPY``, committed first) in this same migration.
        "DROP TABLE updates",
        "DROP TABLE snapshots",
    ),
}

# The archive file (``<store>.archive``): written only by the maintenance connection.
ARCHIVE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS updates (
           id     INTEGER PRIMARY KEY,
           room   TEXT NOT NULL,
           data   BLOB NOT NULL,
           author TEXT,
           ts     REAL NOT NULL
       )""",
    "CREATE INDEX IF NOT EXISTS updates_by_room ON updates (room, id)",
    """CREATE TABLE IF NOT EXISTS snapshots (
           room       TEXT PRIMARY KEY,
           data       BLOB NOT NULL,
           upto_id    INTEGER NOT NULL,
           updated_at REAL NOT NULL
       )""",
    # Every row of ``recent`` with an id up to ``upto`` is in ``updates`` (or was, and was pruned).
    "CREATE TABLE IF NOT EXISTS merged (k INTEGER PRIMARY KEY CHECK (k = 0), upto INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO merged (k, upto) VALUES (0, 0)",
)
# Moving a version 1-4 file's log and snapshots into the archive (idempotent: a crash between the
# archive's commit and the main file's leaves both copies, and the next start copies again).
_ARCHIVE_COPY = (
    "INSERT OR IGNORE INTO updates (id, room, data, author, ts) "
    "SELECT id, room, data, author, ts FROM hot.updates ORDER BY id",
    "INSERT OR REPLACE INTO snapshots (room, data, upto_id, updated_at) "
    "SELECT room, data, upto_id, updated_at FROM hot.snapshots",
    # Every id in recent is above every id in a version 4 file's updates.
    "UPDATE merged SET upto = max(upto, (SELECT coalesce(max(id), 0) FROM hot.updates))",
)
ARCHIVE_SUFFIX = ".archive"

# How long a writer waits for another process's write lock before its commit fails.
DEFAULT_BUSY_TIMEOUT = 5.0
# After a checkpoint the WAL file is truncated to this size, so one burst does not keep its disk space.
WAL_SIZE_LIMIT = 64 * 1024 * 1024
# Compaction retries when another compactor won the race, then leaves the room to the winner.
COMPACT_ATTEMPTS = 3
# Remember this many room names known to be in the rooms table (skips a statement per batch).
KNOWN_ROOMS_CACHE = 100_000

T = TypeVar("T")

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
        history_keep: int = DEFAULT_HISTORY_KEEP,
        fold_cache_bytes: int = DEFAULT_FOLD_CACHE_BYTES,
        commit_interval: float = DEFAULT_COMMIT_INTERVAL,
        writer: str = "thread",
    ) -> None:
        path = Path(path).expanduser()
        if str(path) in ("", ".") or str(path).startswith(":memory:"):
            raise ValueError("SQLiteStore needs a file path (two connections share it)")
        mode = synchronous.upper()
        if mode not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        if busy_timeout < 0:
            raise ValueError("busy_timeout must be >= 0")
        if writer not in ("thread", "process"):
            raise ValueError(f"writer must be 'thread' or 'process', not {writer!r}")
        super().__init__(max_pending=max_pending, max_pending_bytes=max_pending_bytes, commit_interval=commit_interval)
        self.path = path
        self.synchronous: Synchronous = "FULL" if mode == "FULL" else "NORMAL"
        self.busy_timeout = busy_timeout
        self.history_keep = check_history_keep(history_keep)
        self._folds = FoldCache(fold_cache_bytes)  # the Doc of each room's last fold, for its next one

        self.archive_path = path.with_name(path.name + ARCHIVE_SUFFIX)

        self._writer: aiosqlite.Connection | None = None
        # Group commits in a process of their own (``writer="process"``, see storage.sqlite_writer):
        # None while it is not running; started again by the flusher after it died or failed to
        # start, at most once per WRITER_PROCESS_RETRY seconds (batches are written in-process meanwhile).
        self.writer_mode = writer
        self._process: WriterProcess | None = None
        self._process_retry_at = 0.0
        self._reader: aiosqlite.Connection | None = None
        self._maint: aiosqlite.Connection | None = None
        self._writer_suspect = False
        self._reader_suspect = False
        self._maint_suspect = False
        self._write_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()
        self._maint_lock = asyncio.Lock()
        self._known_rooms: set[str] = set()
        self._unmerged = 0  # rows this process put in ``recent`` since its last merge
        self._merge_task: asyncio.Task[None] | None = None
        self._merge_again = False  # a merge was asked for while one ran
        self._delete_upto = 0  # rows of ``recent`` up to this id are merged: the next batch deletes them
        # The largest ``merged.upto`` this store has seen (its merges, its reads). ``merged.upto``
        # only grows, so reads of ``recent`` start above it: the copies below it -- up to
        # MERGE_ROWS rows until the next batch deletes them, and the rows the merges already
        # moved -- are skipped by the rowid range instead of scanned (``recent`` has no index).
        self._merged_floor = 0
        self._loads: list[tuple[str, asyncio.Future[RoomRead]]] = []  # room loads for the next read
        self._load_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<SQLiteStore {str(self.path)!r} {self._state}>"

    # -- lifecycle ---------------------------------------------------------------------------

    async def _open_backend(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = await self._connect()
            self._maint = await self._connect_archive()
            await self._migrate(self._writer, self._maint)
            self._reader = await self._connect(read_only=True)
            if self.writer_mode == "process":
                await self._start_process()
        except (OSError, sqlite3.Error) as exc:
            await self._close_connections()
            raise StoreError(f"cannot open SQLite store {str(self.path)!r}: {exc}") from exc
        except BaseException:
            await self._close_connections()
            raise

    async def _close_backend(self) -> None:
        self._folds.clear()
        process, self._process = self._process, None
        if process is not None:
            await process.close()  # after the flusher drained: it holds no batch
        task, self._merge_task = self._merge_task, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)  # it logs its own failure
        task, self._load_task = self._load_task, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)  # its waiters got its errors
        async with self._write_lock, self._read_lock, self._maint_lock:
            await self._close_connections()

    async def _connect(self, *, read_only: bool = False) -> aiosqlite.Connection:
        """The writer, or the reader (with the archive attached as ``archive``), on the main file."""
        async def as_reader(db: aiosqlite.Connection) -> None:
            await db.execute("ATTACH DATABASE ? AS archive", (str(self.archive_path),))
            await db.execute("PRAGMA query_only = ON")

        if read_only:
            return await self._open_wal(self.path, self.synchronous, 64, as_reader)
        return await self._open_wal(self.path, self.synchronous, WRITER_CACHED_STATEMENTS)

    async def _connect_archive(self) -> aiosqlite.Connection:
        """The maintenance connection: the archive file, with the main file attached as ``hot``.

        Always ``synchronous=FULL``: a merge's commit must be on disk before the main file drops
        the rows it copied (the two files' WALs are synced separately), and it costs the group
        commits nothing -- this connection is theirs to never wait for."""
        async def as_maintenance(db: aiosqlite.Connection) -> None:
            await db.execute(f"PRAGMA cache_size = {-ARCHIVE_CACHE_KIB}")
            for statement in ARCHIVE_SCHEMA:
                await db.execute(statement)
            await db.execute("ATTACH DATABASE ? AS hot", (str(self.path),))

        return await self._open_wal(self.archive_path, "FULL", 64, as_maintenance)

    async def _open_wal(
        self, path: Path, synchronous: str, cached_statements: int,
        setup: Callable[[aiosqlite.Connection], Awaitable[None]] | None = None,
    ) -> aiosqlite.Connection:
        """A connection to ``path`` in WAL mode with our pragmas, then ``setup``; closed again if
        any of it fails."""
        # isolation_level=None: no implicit transactions; every transaction here is explicit.
        db = await aiosqlite.connect(path, isolation_level=None, cached_statements=cached_statements)
        try:
            await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            async with db.execute("PRAGMA journal_mode = WAL") as cursor:
                row = await cursor.fetchone()
            if row is None or str(row[0]).lower() != "wal":
                raise StoreError(f"{str(path)!r} cannot use WAL (journal_mode={row})")
            await db.execute(f"PRAGMA synchronous = {synchronous}")
            await db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            if setup is not None:
                await setup(db)
        except BaseException:
            await db.close()
            raise
        return db

    async def _migrate(self, db: aiosqlite.Connection, maint: aiosqlite.Connection) -> None:
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
                if version == 5 and current >= 1:
                    # Copy the log and snapshots (as committed: this transaction's own changes are
                    # invisible to the other connection) and commit that before they are dropped here.
                    await _in_thread(maint, _copy_to_archive)
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

    async def _start_process(self) -> None:
        """Start the writer process (after a dead one is reaped); if it cannot start, say so and
        write in-process until the next try."""
        old, self._process = self._process, None
        if old is not None:
            await old.close()
        try:
            self._process = await WriterProcess.start(str(self.path), self.synchronous, self.busy_timeout, WAL_SIZE_LIMIT)
        except Exception as exc:  # noqa: BLE001 - the in-process writer carries on
            self._process_retry_at = time.monotonic() + WRITER_PROCESS_RETRY
            log.warning("cannot start the SQLite writer process of %s (writing in-process): %r", self.path, exc)

    def _process_due(self) -> bool:
        """Should the flusher (re)start the writer process before its next batch?"""
        process = self._process
        return (self.writer_mode == "process" and self._state == "open" and (process is None or not process.alive)
                and time.monotonic() >= self._process_retry_at)

    async def _close_connections(self) -> None:
        for db in (self._writer, self._reader, self._maint):
            if db is not None:
                await _close_quietly(db)
        self._writer = self._reader = self._maint = None

    # -- the flusher's transaction ---------------------------------------------------------

    async def _write_batch(self, batch: list[Pending]) -> list[int]:
        if self._process_due():
            await self._start_process()  # for the next batches; this one is written in-process
        rows, new_rooms = self._rows_of(batch)
        merge = self._merge_due(len(rows))
        async with self._write_lock:
            db = await self._writable()
            delete_upto = self._take_delete()
            last_id = await _in_thread(db, _insert_batch, rows, sorted(new_rooms), time.time(), delete_upto)
        if merge:
            self._request_merge()
        return self._written_ids(batch, new_rooms, last_id)

    def _merge_due(self, rows: int) -> bool:
        """Count rows this process put in ``recent``; True (and start again) when the batch
        that brings them to MERGE_ROWS should be followed by a merge."""
        self._unmerged += rows
        if self._unmerged < MERGE_ROWS:
            return False
        self._unmerged = 0
        return True

    def _take_delete(self) -> int:
        """The id up to which the next batch deletes merged rows from ``recent`` (0: none due).
        If that batch fails, the rows stay: reads skip them, and the next merge's delete takes them."""
        upto, self._delete_upto = self._delete_upto, 0
        return upto

    # -- the archive: merges and compaction, on the maintenance connection ------------------

    def _request_merge(self) -> None:
        """Copy ``recent`` to the archive soon, off the group commits' path (one merge at a time)."""
        if self._state != "open":
            return
        task = self._merge_task
        if task is not None and not task.done():
            self._merge_again = True
            return
        self._merge_task = asyncio.get_running_loop().create_task(self._merge_forever())

    async def _merge_forever(self) -> None:
        self._merge_again = True
        while self._merge_again and self._state == "open":
            self._merge_again = False
            try:
                self._merged(await self._in_archive(_merge_recent))
            except Exception as exc:  # noqa: BLE001 - nothing is lost; the next merge tries again
                log.warning("moving recent rows of %s to its archive failed: %r", self.path, exc)
                return

    def _merged(self, upto: int) -> None:
        if upto > self._delete_upto:
            self._delete_upto = upto
        self._saw_merged(upto)

    def _saw_merged(self, upto: int) -> None:
        if upto > self._merged_floor:
            self._merged_floor = upto

    async def _in_archive(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` on the maintenance connection, under its lock: the connection
        is checked and reconnected first after a failure, and any failure marks it for that."""
        if self._state == "closed":
            raise StoreClosed(f"{self!r} is closed")
        async with self._maint_lock:
            try:
                self._maint = await self._usable(
                    self._maint, self._maint_suspect, "archive writer", self._connect_archive)
                self._maint_suspect = False
                return await _in_thread(self._maint, fn, *args)
            except Exception:
                self._maint_suspect = True
                raise

    def _rows_of(self, batch: list[Pending]) -> tuple[list[tuple[str, bytes, str | None, float]], set[str]]:
        """A batch's rows for ``_insert_batch``, and its rooms not yet known to be in the rooms table."""
        return [(p.room, p.data, p.author, p.ts) for p in batch], {p.room for p in batch} - self._known_rooms

    def _written_ids(self, batch: list[Pending], new_rooms: set[str], last_id: int) -> list[int]:
        """After a batch's commit: remember its rooms; its ids (with the write lock held, one
        transaction's rows get consecutive ids, ending at the last one)."""
        if len(self._known_rooms) + len(new_rooms) > KNOWN_ROOMS_CACHE:
            self._known_rooms.clear()
        self._known_rooms |= new_rooms
        return list(range(last_id - len(batch) + 1, last_id + 1))

    def _can_start_write(self) -> bool:
        # Not while someone holds the writer (a chat or meta transaction may span several queued
        # calls) or it needs a health check / reconnect: the flusher task does those. (Only
        # asked while the store is open.)
        if self._write_lock.locked():
            return False
        process = self._process
        if process is not None:
            return process.alive  # a dead one: the flusher starts another
        if self._process_due():
            return False
        writer = self._writer
        return writer is not None and writer._running and not self._writer_suspect

    def _start_write(self, batch: list[Pending], done: Callable[[list[int] | None, BaseException | None], None]) -> None:
        """``_write_batch`` without a task: ``_insert_batch`` is sent to the writer process, whose
        answer calls ``done`` from the socket's I/O callback, or else queued on the writer's thread
        (after whatever is queued there, each a whole transaction), which reports back with one
        ``call_soon_threadsafe`` straight into ``done`` -- no future to resolve, no task to wake."""
        rows, new_rooms = self._rows_of(batch)
        merge = self._merge_due(len(rows))
        delete_upto = self._take_delete()
        loop = asyncio.get_running_loop()

        def finished(last_id: int | None, exc: BaseException | None) -> None:
            if last_id is not None:
                done(self._written_ids(batch, new_rooms, last_id), None)
                if merge:
                    self._request_merge()
            else:
                done(None, exc)

        process = self._process
        if process is not None:
            process.submit(rows, sorted(new_rooms), time.time(), delete_upto, finished)
            return
        writer = self._writer
        assert writer is not None

        def job() -> None:  # on the writer's thread
            try:
                last_id = _insert_batch(writer._conn, rows, sorted(new_rooms), time.time(), delete_upto)
            except BaseException as exc:  # noqa: BLE001 - reported to the loop, like aiosqlite does
                loop.call_soon_threadsafe(finished, None, exc)
            else:
                loop.call_soon_threadsafe(finished, last_id, None)

        # aiosqlite's own queue (a (future, function) pair; no future: we report ourselves), so the
        # job runs in order with every other call on this connection.
        writer._tx.put_nowait((None, job))

    def _write_failed(self, exc: BaseException) -> None:
        self._writer_suspect = True

    async def _usable(
        self, db: aiosqlite.Connection | None, suspect: bool, role: str,
        connect: Callable[[], Awaitable[aiosqlite.Connection]],
    ) -> aiosqlite.Connection:
        """``db`` if it is there and, after a failure on it (``suspect``), still answers; else a
        new connection from ``connect`` (a broken one is closed first). The caller holds the
        connection's lock, stores the result and clears its ``suspect`` flag."""
        if db is not None and suspect:
            try:
                await db.execute_fetchall("SELECT 1")
            except Exception:
                log.warning("reconnecting the SQLite %s of %s", role, self.path)
                await _close_quietly(db)
                db = None
        return db if db is not None else await connect()

    async def _writable(self) -> aiosqlite.Connection:
        """The writer connection; after a failed write, checked and reconnected if broken."""
        if self._state == "closed":
            raise StoreClosed(f"{self!r} is closed")
        self._writer = await self._usable(self._writer, self._writer_suspect, "writer", self._connect)
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

    async def _read_room(self, room: str) -> RoomRead:
        """Snapshot, its upto_id and the tail rows (id, data), from one read transaction: the
        read of every room asked for while the one before was on the reader's thread (see
        ``_load_rooms``)."""
        self._check_open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RoomRead] = loop.create_future()
        self._loads.append((room, future))
        if self._load_task is None or self._load_task.done():
            self._load_task = loop.create_task(self._load_rooms())
        return await future

    async def _load_rooms(self) -> None:
        """Room loads in batches, like the group commit: while one batch is on the reader's
        thread, the loads asked for meanwhile wait, and go together as the next one (up to
        LOAD_BATCH rooms, one read transaction of four statements whatever their number).

        Why: a thread gets the GIL back from a busy event loop only every switch interval (5 ms),
        and each SQLite statement gives it up. A load of its own was six statements, so 250
        rooms loading at once behind a storm of 1,000 reconnecting clients waited 10 ms to 1 s
        for their loads (240 ms on average; 0.1 ms each on an idle loop)."""
        while self._loads:
            batch, self._loads = self._loads[:LOAD_BATCH], self._loads[LOAD_BATCH:]
            try:
                async with self._reading() as db:
                    reads, merged = await _in_thread(
                        db, _read_rooms, list(dict.fromkeys(room for room, _ in batch)), self._merged_floor)
                self._saw_merged(merged)
            except Exception as exc:  # noqa: BLE001 - each waiter raises it (StoreError, StoreClosed)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            except BaseException:
                for _, future in [*batch, *self._loads]:
                    future.cancel()
                self._loads.clear()
                raise
            for room, future in batch:
                if not future.done():
                    future.set_result(reads[room])

    async def history(
        self,
        room: str,
        *,
        after_id: int = 0,
        before_id: int | None = None,
        limit: int = 1000,
        author: str | None = None,
    ) -> list[StoredUpdate]:
        check_room(room)
        check_history_args(after_id, before_id, limit, author)
        where = "room = ? AND id > ?"
        args: list[Any] = [room, max(0, after_id)]
        if before_id is not None:
            where += " AND id < ?"
            args.append(before_id)
        if author is not None:
            where += " AND author = ?"
            args.append(author)
        async with self._reading() as db:
            rows = await _in_thread(db, _history, where, args, limit, self._merged_floor)
        return [
            StoredUpdate(id=int(i), room=room, data=bytes(d), author=a, ts=float(t))
            for i, d, a, t in rows
        ]

    async def rooms(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        async with self._reading() as db:
            return await _in_thread(db, _room_names, prefix)

    async def ping(self) -> None:
        async with self._reading() as db:
            await db.execute_fetchall("SELECT 1")
        self._check_flusher()
        if self._writer_suspect:  # the last commit failed: is the database writable again?
            try:
                async with self._write_lock:
                    await self._writable()
            except (sqlite3.Error, ValueError, OSError) as exc:
                raise StoreError(f"SQLite writer unavailable: {exc}") from exc

    def _reading(self) -> _Reading:
        self._check_open()
        return _Reading(self)

    # -- metadata ----------------------------------------------------------------------------

    async def get_meta(self, room: str, key: str) -> bytes | None:
        check_room(room)
        check_meta_key(key)
        async with self._reading() as db:
            rows = await db.execute_fetchall(
                "SELECT value FROM meta WHERE room = ? AND key = ?", (room, key)
            )
        rows = list(rows)
        return bytes(rows[0][0]) if rows else None

    async def list_meta(self, room: str, prefix: str = "") -> dict[str, bytes]:
        check_room(room)
        check_meta_prefix(prefix)
        sql = "SELECT key, value FROM meta WHERE room = ? AND key >= ?"
        args: list[Any] = [room, prefix]
        if (upper := prefix_upper_bound(prefix)) is not None and prefix:
            sql += " AND key < ?"
            args.append(upper)
        async with self._reading() as db:
            rows = await db.execute_fetchall(sql + " ORDER BY key", args)
        return {str(k): bytes(v) for k, v in rows}

    async def put_meta(self, room: str, key: str, value: bytes | None) -> None:
        check_room(room)
        check_meta_key(key)
        check_meta_value(value)
        self._check_open()
        try:
            async with self._write_lock:
                db = await self._writable()
                await _in_thread(db, _put_meta, room, key, value, time.time())
        except _TooManyKeys:
            raise ValueError(f"room {room!r} already holds {MAX_META_KEYS} meta keys") from None
        except (sqlite3.Error, ValueError) as exc:
            self._writer_suspect = True
            raise StoreError(f"writing meta {key!r} of {room!r} failed: {exc}") from exc

    # -- chat --------------------------------------------------------------------------------

    async def _chat_write(self, what: str, fn: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """``fn`` in one BEGIN IMMEDIATE transaction on the writer, committed before returning."""
        self._check_open()
        try:
            async with self._write_lock:
                db = await self._writable()
                try:
                    await db.execute("BEGIN IMMEDIATE")
                    result = await fn(db)
                    await db.execute("COMMIT")
                    return result
                except BaseException:
                    await _rollback(db)
                    raise
        except _ChatConflict as conflict:
            raise ValueError(str(conflict)) from None
        except (sqlite3.Error, ValueError) as exc:
            self._writer_suspect = True
            raise StoreError(f"chat {what} failed: {exc}") from exc

    async def chat_add(self, message: ChatMessage) -> None:
        check_chat_message(message)

        async def write(db: aiosqlite.Connection) -> None:
            try:
                await db.execute(
                    f"INSERT INTO chat_messages ({CHAT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    to_row(message),
                )
            except sqlite3.IntegrityError:
                raise _ChatConflict(f"message {message.id!r} already exists in {message.room!r}") from None
            await db.executemany(
                "INSERT OR IGNORE INTO chat_mentions (user_id, room, message_id, read) VALUES (?, ?, ?, 0)",
                [(user, message.room, message.id) for user in message.mentions],
            )

        await self._chat_write("add", write)

    async def chat_get(self, room: str, message_id: str) -> ChatMessage | None:
        check_room(room)
        check_chat_id("message id", message_id)
        async with self._reading() as db:
            rows = list(await db.execute_fetchall(
                f"SELECT {CHAT_COLUMNS} FROM chat_messages WHERE room = ? AND id = ?", (room, message_id)))
        return from_row(rows[0]) if rows else None

    async def chat_history(self, room: str, *, before: str | None = None, limit: int = 50) -> list[ChatMessage]:
        check_room(room)
        check_limit(limit)
        sql = f"SELECT {CHAT_COLUMNS} FROM chat_messages WHERE room = ?"
        args: list[Any] = [room]
        if before is not None:
            check_chat_id("before", before)
            sql += " AND id < ?"
            args.append(before)
        async with self._reading() as db:
            rows = await db.execute_fetchall(sql + " ORDER BY id DESC LIMIT ?", (*args, limit))
        return [from_row(row) for row in reversed(list(rows))]

    async def _locked_message(self, db: aiosqlite.Connection, room: str, message_id: str) -> ChatMessage | None:
        rows = list(await db.execute_fetchall(
            f"SELECT {CHAT_COLUMNS} FROM chat_messages WHERE room = ? AND id = ?", (room, message_id)))
        return from_row(rows[0]) if rows else None

    async def chat_edit(self, room: str, message_id: str, text: str, *, mentions: tuple[str, ...] = (),
                        edited_ts: float | None = None) -> ChatMessage | None:
        check_room(room)
        check_chat_id("message id", message_id)
        check_chat_text(text)
        check_mentions(mentions)
        stamp = time.time() if edited_ts is None else edited_ts

        async def write(db: aiosqlite.Connection) -> ChatMessage | None:
            current = await self._locked_message(db, room, message_id)
            if current is None or current.deleted:
                return None
            await db.execute(
                "UPDATE chat_messages SET text = ?, mentions = ?, edited_ts = ? WHERE room = ? AND id = ?",
                (text, dump_mentions(mentions), stamp, room, message_id),
            )
            gone = [(user, room, message_id) for user in current.mentions if user not in mentions]
            await db.executemany(
                "DELETE FROM chat_mentions WHERE user_id = ? AND room = ? AND message_id = ?", gone)
            await db.executemany(
                "INSERT OR IGNORE INTO chat_mentions (user_id, room, message_id, read) VALUES (?, ?, ?, 0)",
                [(user, room, message_id) for user in mentions],
            )
            return await self._locked_message(db, room, message_id)

        return await self._chat_write("edit", write)

    async def chat_delete(self, room: str, message_id: str) -> ChatMessage | None:
        check_room(room)
        check_chat_id("message id", message_id)

        async def write(db: aiosqlite.Connection) -> ChatMessage | None:
            await db.execute(
                "UPDATE chat_messages SET text = '', anchor = NULL, mentions = '[]', reactions = '{}', "
                "deleted = 1 WHERE room = ? AND id = ?", (room, message_id))
            await db.execute("DELETE FROM chat_mentions WHERE room = ? AND message_id = ?", (room, message_id))
            return await self._locked_message(db, room, message_id)

        return await self._chat_write("delete", write)

    async def chat_react(self, room: str, message_id: str, emoji: str, user: str) -> ChatMessage | None:
        check_room(room)
        check_chat_id("message id", message_id)
        check_emoji(emoji)
        check_user(user)

        async def write(db: aiosqlite.Connection) -> ChatMessage | None:
            current = await self._locked_message(db, room, message_id)
            if current is None or current.deleted:
                return None
            try:
                reactions = toggle_reaction(current.reactions, emoji, user)
            except ValueError as exc:
                raise _ChatConflict(str(exc)) from None
            await db.execute("UPDATE chat_messages SET reactions = ? WHERE room = ? AND id = ?",
                             (dump_reactions(reactions), room, message_id))
            return await self._locked_message(db, room, message_id)

        return await self._chat_write("react", write)

    async def chat_mentions(self, user: str, *, unread_only: bool = True, before: str | None = None,
                            limit: int = 100) -> list[ChatMention]:
        check_user(user)
        check_limit(limit)
        columns = ", ".join(f"c.{c.strip()}" for c in CHAT_COLUMNS.split(","))
        sql = (f"SELECT m.read, {columns} FROM chat_mentions m JOIN chat_messages c "
               "ON c.room = m.room AND c.id = m.message_id WHERE m.user_id = ?")
        args: list[Any] = [user]
        if unread_only:
            sql += " AND m.read = 0"
        if before is not None:
            check_chat_id("before", before)
            sql += " AND m.message_id < ?"
            args.append(before)
        async with self._reading() as db:
            rows = await db.execute_fetchall(sql + " ORDER BY m.message_id DESC LIMIT ?", (*args, limit))
        return [ChatMention(user=user, read=bool(row[0]), message=from_row(row[1:])) for row in rows]

    async def chat_mark_read(self, user: str, room: str, upto: str) -> int:
        check_user(user)
        check_room(room)
        check_chat_id("upto", upto)

        async def write(db: aiosqlite.Connection) -> int:
            cursor = await db.execute(
                "UPDATE chat_mentions SET read = 1 WHERE user_id = ? AND room = ? AND message_id <= ? "
                "AND read = 0", (user, room, upto))
            return int(cursor.rowcount)

        return await self._chat_write("mark read", write)

    async def chat_put_users(self, users: Sequence[tuple[str, str, str]]) -> None:
        rows = checked_users(users)
        if not rows:
            return

        async def write(db: aiosqlite.Connection) -> None:
            await db.executemany(
                "INSERT INTO chat_users (room, user_id, name, last_seen) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (room, user_id) DO UPDATE SET name = excluded.name, last_seen = excluded.last_seen",
                rows)

        await self._chat_write("put users", write)

    async def chat_users(self, room: str) -> dict[str, str]:
        check_room(room)
        async with self._reading() as db:
            rows = await db.execute_fetchall(
                "SELECT user_id, name FROM chat_users WHERE room = ? ORDER BY user_id", (room,))
        return {str(u): str(n) for u, n in rows}

    # -- compaction --------------------------------------------------------------------------

    async def compact(self, room: str) -> bool:
        check_room(room)
        for _ in range(COMPACT_ATTEMPTS):
            snapshot, upto_id, tail = await self._archived_room(room)
            if not tail:
                return False
            new_upto_id = tail[-1][0]
            try:
                folded = await asyncio.to_thread(self._folds.fold, room, snapshot, [d for _, d in tail])
            except Exception as exc:  # pycrdt refused a stored update: leave the rows alone
                raise StoreError(f"cannot fold room {room!r}: {exc}") from exc
            if await self._replace_snapshot(room, folded, upto_id, new_upto_id):
                return True
        return False

    async def _archived_room(self, room: str) -> RoomRead:
        """What compaction folds: the room's snapshot and every row above it, from both files."""
        self._check_open()
        try:
            read, merged = await self._in_archive(_read_for_compaction, room, self._merged_floor)
            self._saw_merged(merged)
            return read
        except (sqlite3.Error, ValueError) as exc:
            raise StoreError(f"compaction of {room!r} failed: {exc}") from exc

    async def _replace_snapshot(
        self, room: str, folded: bytes, expected_upto_id: int, new_upto_id: int
    ) -> bool:
        self._check_open()
        try:
            written, merged_upto = await self._in_archive(
                _replace_snapshot, room, folded, expected_upto_id, new_upto_id, self.history_keep, time.time())
        except (sqlite3.Error, ValueError) as exc:
            raise StoreError(f"compaction of {room!r} failed: {exc}") from exc
        if merged_upto:
            self._merged(merged_upto)
        return written


class _TooManyKeys(Exception):
    pass


class _ChatConflict(Exception):
    """A chat write refused for a reason the caller caused (duplicate id, too many reactions)."""


class _Reading:
    """``async with`` the reader connection; errors become StoreError.

    Reads are not serialized here: each is one call on the connection's own queue (a whole read:
    see ``_room_names`` for why never a cursor stepped across calls), which its thread runs back
    to back. A lock held across each read made every read wait for the one before it to come
    back to the event loop and hand the lock on -- two loop iterations per read: 1,000 clients
    joining at once (a room load and a chat history read each) waited ~600 ms for their first
    sync on a busy loop. ``_read_lock`` now only makes one task at a time check or reconnect the
    connection after a failed read."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    async def __aenter__(self) -> aiosqlite.Connection:
        store = self._store
        if store._state != "open":
            raise StoreClosed(f"{store!r} is not open")
        reader = store._reader
        if reader is not None and not store._reader_suspect:
            return reader
        async with store._read_lock:
            try:
                if store._state != "open":
                    raise StoreClosed(f"{store!r} is not open")
                store._reader = await store._usable(
                    store._reader, store._reader_suspect, "reader", functools.partial(store._connect, read_only=True))
                store._reader_suspect = False
                return store._reader
            except (sqlite3.Error, ValueError, OSError) as exc:
                raise StoreError(f"SQLite reader unavailable: {exc}") from exc

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        store = self._store
        # aiosqlite raises ValueError for a closed connection (UnicodeError: a bad argument).
        if isinstance(exc, (sqlite3.Error, ValueError)) and not isinstance(exc, UnicodeError):
            store._reader_suspect = True
            raise StoreError(f"SQLite read failed: {exc}") from exc


# -- whole transactions, each run in its connection's own thread as ONE call ----------------------
#
# Every aiosqlite await is a hop to the connection's thread and a wakeup of the event loop on the way
# back; a transaction of five statements paid for ten. These run a whole transaction as one plain
# function on the connection's thread (``_in_thread``): one hop, and the sqlite3 calls release the
# GIL while SQLite works. A writer holds ``_write_lock``, so nothing else is queued on the writer in
# between; reads interleave on the reader's queue, each call a whole read of its own (a transaction
# opened and ended in the call). Each function ends its own transaction, also on error.


async def _in_thread(db: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """``fn(connection, *args)`` on ``db``'s thread, in order with the rest of its queue.

    aiosqlite has no public call for this; ``_execute`` is what its own methods queue work with
    (tests/storage counts on it). Raises ValueError, like aiosqlite, if ``db`` is closed.
    """
    return await db._execute(_call_with_connection, db, fn, args)


def _call_with_connection(db: aiosqlite.Connection, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    return fn(db._conn, *args)  # _conn raises ValueError once the connection is closed


# After the writer process failed to start, try again this much later (writing in-process meanwhile).
WRITER_PROCESS_RETRY = 5.0
# Rows a process puts in ``recent`` before it has them all copied to the archive. Each merge
# writes an index page per room in it whatever its number of rows there: 2,048 -> 8,192 took the
# archive thread from ~12 to ~10.5 us of CPU per update at 10,000 updates/s in 250 rooms (reads
# of ``recent`` skip the merged rows by rowid, so a longer ``recent`` costs them nothing).
MERGE_ROWS = 8192
# Rooms read by one batched load (``_read_rooms``): three bound parameters each.
LOAD_BATCH = 256
# The maintenance connection's page cache: the archive index's pages each merge touches (one per
# room in it) stay in memory.
ARCHIVE_CACHE_KIB = 32 * 1024
def _merge_recent(conn: sqlite3.Connection) -> int:
    """On the maintenance connection: copy the rows of ``recent`` not yet in the archive, in one
    archive transaction (which reads the main file as of its first read of it: every row there
    up to the largest id it sees is committed, and later rows get larger ids). Returns the new
    ``merged.upto``: the main file may delete its rows up to it."""
    _begin_archive_write(conn)
    try:
        upto = _merge_in_transaction(conn)
        conn.execute("COMMIT")
    except BaseException:
        _rollback_sync(conn)
        raise
    return upto


def _begin_archive_write(conn: sqlite3.Connection) -> None:
    """Begin a write transaction on the maintenance connection holding the archive's write lock
    only. (``BEGIN IMMEDIATE`` would take the write lock of every attached file, the main one's
    too, and the group commits would wait for this transaction.) A deferred transaction whose
    first statement writes the archive takes its lock there, waiting on the busy handler."""
    conn.execute("BEGIN")
    try:
        conn.execute("UPDATE merged SET upto = upto")
    except BaseException:
        _rollback_sync(conn)
        raise


def _merge_in_transaction(conn: sqlite3.Connection) -> int:
    (done,) = conn.execute("SELECT upto FROM merged").fetchone()
    (newest,) = conn.execute("SELECT coalesce(max(id), 0) FROM hot.recent").fetchone()
    if newest > done:
        conn.execute(
            "INSERT INTO updates (id, room, data, author, ts) "
            "SELECT id, room, data, author, ts FROM hot.recent WHERE id > ? AND id <= ? ORDER BY id",
            (done, newest),
        )
        conn.execute("UPDATE merged SET upto = ?", (newest,))
        return int(newest)
    return int(done)


def _read_for_compaction(conn: sqlite3.Connection, room: str, floor: int) -> tuple[RoomRead, int]:
    """Compaction's read, on the maintenance connection, in one read transaction: the room's
    snapshot and every row above it, archived or still only in ``recent`` (read first: see "Reads
    across the files"; only its rows above ``floor``, see ``_recent_rows``), and ``merged.upto``.
    No merge: forcing one per compaction (as this did until 2026-11-24) made
    merges three times as frequent under load, each writing an index page per active room and
    syncing the archive -- two thirds of the archive's CPU at 12,500 updates/s."""
    conn.execute("BEGIN")
    try:
        hot, done = _recent_rows(conn, "SELECT id, data FROM hot.recent WHERE id > ?1 AND room = ?2 ORDER BY id",
                                 (floor, room), floor, "SELECT upto FROM merged")
        snapshot, upto_id = _read_snapshot(conn, room)
        rows = conn.execute(
            "SELECT id, data FROM updates WHERE room = ? AND id > ? ORDER BY id", (room, upto_id)
        ).fetchall()
    finally:
        _rollback_sync(conn)  # ends the read transaction
    # Every archived row is at or below ``done``; the rows of ``recent`` above it follow them.
    tail = [(int(i), bytes(d)) for i, d in rows]
    tail += [(int(i), bytes(d)) for i, d in hot if i > max(done, upto_id)]
    return (snapshot, upto_id, tail), done


def _recent_rows(conn: sqlite3.Connection, query: str, args: tuple[Any, ...], floor: int,
                 merged_query: str) -> tuple[list[Any], int]:
    """The rows of ``recent`` that ``query`` selects with ``id > floor`` (its ``?1``), then
    ``merged.upto`` (``merged_query``): the first reads of the caller's read transaction, in the
    order "Reads across the files" needs. ``floor`` is a ``merged.upto`` seen before, so every row
    at or below it is a copy the caller skips anyway; should ``merged.upto`` ever be below it (the
    files replaced under a running server), the rows are read again from 0 -- in the same
    transaction, so from the same view of the main file."""
    rows = conn.execute(query, args).fetchall()
    (merged,) = conn.execute(merged_query).fetchone()
    if merged < floor:
        rows = conn.execute(query, (0, *args[1:])).fetchall()
    return rows, int(merged)


def _copy_to_archive(conn: sqlite3.Connection) -> None:
    """The version 5 migration's first half, on the maintenance connection (see ``_ARCHIVE_COPY``)."""
    _begin_archive_write(conn)
    try:
        for statement in _ARCHIVE_COPY:
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        _rollback_sync(conn)
        raise


def _room_names(conn: sqlite3.Connection, prefix: str) -> list[str]:
    """Names of rooms starting with ``prefix``, in one call: reads share the reader's queue, and
    a cursor stepped across several calls could be aborted by another read's ROLLBACK."""
    names: list[str] = []
    # BINARY collation orders UTF-8 by code point, so names with the prefix are contiguous.
    for (name,) in conn.execute("SELECT name FROM rooms WHERE name >= ? ORDER BY name", (prefix,)):
        if not name.startswith(prefix):
            break
        names.append(name)
    return names


def _read_rooms(conn: sqlite3.Connection, rooms: list[str], floor: int) -> tuple[dict[str, RoomRead], int]:
    """Snapshot, upto_id and tail rows of each of ``rooms`` (distinct), on the reader, in one read
    transaction (see "Reads across the files" for the order): ``recent`` first, then
    ``merged``, the snapshots and the archived rows above each room's snapshot -- one statement each,
    whatever the number of rooms (``CROSS JOIN`` keeps the rooms as the outer loop, so each
    room's rows come from the (room, id) index)."""
    marks = ",".join("?" * len(rooms))
    conn.execute("BEGIN")
    try:
        hot, merged = _recent_rows(
            conn, f"SELECT room, id, data FROM main.recent WHERE id > ?1 AND room IN ({marks}) ORDER BY id",
            (floor, *rooms), floor, "SELECT upto FROM archive.merged")
        snapshots = {room: (data, int(upto)) for room, data, upto in conn.execute(
            f"SELECT room, data, upto_id FROM snapshots WHERE room IN ({marks})", rooms).fetchall()}
        upto = {room: snapshots[room][1] if room in snapshots else 0 for room in rooms}
        wanted = [value for room in rooms for value in (room, upto[room])]
        archived = conn.execute(
            f"WITH wanted(room, upto) AS (VALUES {','.join(['(?, ?)'] * len(rooms))}) "
            "SELECT u.room, u.id, u.data FROM wanted CROSS JOIN archive.updates AS u "
            "WHERE u.room = wanted.room AND u.id > wanted.upto ORDER BY u.id", wanted).fetchall()
    finally:
        _rollback_sync(conn)  # ends the read transaction
    tails: dict[str, list[tuple[int, bytes]]] = {room: [] for room in rooms}
    for room, row_id, data in archived:
        tails[room].append((int(row_id), bytes(data)))
    for room, row_id, data in hot:  # above both the merge and the room's snapshot: not read yet
        if row_id > max(merged, upto[room]):
            tails[room].append((int(row_id), bytes(data)))
    reads: dict[str, RoomRead] = {}
    for room in rooms:
        data = snapshots[room][0] if room in snapshots else None
        reads[room] = (bytes(data) if data is not None else None), upto[room], tails[room]
    return reads, merged


def _history(conn: sqlite3.Connection, where: str, args: list[Any], limit: int, floor: int) -> list[tuple[Any, ...]]:
    """``history``'s rows, from both files in one read transaction (main file first; its rows
    above ``floor``, see ``_recent_rows``)."""
    conn.execute("BEGIN")
    try:
        hot, merged = _recent_rows(
            conn, f"SELECT id, data, author, ts FROM main.recent WHERE id > ?1 AND {where} ORDER BY id",
            (floor, *args), floor, "SELECT upto FROM archive.merged")
        rows = conn.execute(
            f"SELECT id, data, author, ts FROM archive.updates WHERE {where} ORDER BY id LIMIT ?",
            (*args, limit)).fetchall()
    finally:
        _rollback_sync(conn)
    rows += [row for row in hot if row[0] > merged]
    return rows[:limit]


def _replace_snapshot(
    conn: sqlite3.Connection, room: str, folded: bytes, expected_upto_id: int, new_upto_id: int,
    history_keep: int, now: float,
) -> tuple[bool, int]:
    """Compaction's write, on the maintenance connection (the archive file only): the new
    snapshot and the pruning, only if upto_id is still the one read. Returns (written?, the
    ``merged.upto`` of a merge it had to run first, or 0)."""
    _begin_archive_write(conn)
    try:
        _, current = _read_snapshot(conn, room, with_data=False)
        if current != expected_upto_id:
            _rollback_sync(conn)
            return False, 0
        # Folded rows still only in ``recent`` (exact: this transaction holds the archive's write
        # lock, so no merge moves them meanwhile) are the room's newest. They count towards the
        # history kept; if there are more of them than that, pruning must reach into them: they
        # are archived first, by a merge in this same transaction.
        merged = 0
        (done,) = conn.execute("SELECT upto FROM merged").fetchone()
        (unarchived,) = conn.execute(
            "SELECT count(*) FROM hot.recent WHERE room = ? AND id > ? AND id <= ?", (room, done, new_upto_id)
        ).fetchone()
        if unarchived > history_keep:
            merged = _merge_in_transaction(conn)
            unarchived = 0
        conn.execute(
            "INSERT INTO snapshots (room, data, upto_id, updated_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (room) DO UPDATE SET "
            "data = excluded.data, upto_id = excluded.upto_id, "
            "updated_at = excluded.updated_at",
            (room, folded, new_upto_id, now),
        )
        # Retention: keep the newest history_keep rows inside the snapshot (the unarchived ones
        # and the newest archived ones), never a row above it. No cutoff row (fewer rows than
        # that) compares NULL: no delete. Rows of ``recent`` up to ``merged.upto`` are copies,
        # skipped by every read and deleted by the main file.
        conn.execute(
            "DELETE FROM updates WHERE room = ?1 AND id <= ("
            "  SELECT id FROM updates WHERE room = ?1 AND id <= ?2"
            "  ORDER BY id DESC LIMIT 1 OFFSET ?3)",
            (room, new_upto_id, history_keep - unarchived),
        )
        conn.execute("COMMIT")
        return True, merged
    except BaseException:
        _rollback_sync(conn)
        raise


def _put_meta(conn: sqlite3.Connection, room: str, key: str, value: bytes | None, now: float) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        if value is None:
            conn.execute("DELETE FROM meta WHERE room = ? AND key = ?", (room, key))
        elif conn.execute(
            "UPDATE meta SET value = ?, updated_at = ? WHERE room = ? AND key = ?", (value, now, room, key)
        ).rowcount == 0:
            (count,) = conn.execute("SELECT count(*) FROM meta WHERE room = ?", (room,)).fetchone()
            if count >= MAX_META_KEYS:
                raise _TooManyKeys
            conn.execute(
                "INSERT INTO meta (room, key, value, updated_at) VALUES (?, ?, ?, ?)", (room, key, value, now)
            )
        conn.execute("COMMIT")
    except BaseException:
        _rollback_sync(conn)
        raise


def _read_snapshot(conn: sqlite3.Connection, room: str, *, with_data: bool = True) -> tuple[bytes | None, int]:
    columns = "data, upto_id" if with_data else "NULL, upto_id"
    row = conn.execute(f"SELECT {columns} FROM snapshots WHERE room = ?", (room,)).fetchone()
    if row is None:
        return None, 0
    return (bytes(row[0]) if row[0] is not None else None), int(row[1])


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
