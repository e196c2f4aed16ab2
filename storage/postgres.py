"""PostgreSQL document store (asyncpg): storage shared by server nodes on many hosts.

Theory of operation
-------------------
* Connections: one dedicated *writer* connection for the flusher (appends never queue behind reads
  for a pool slot) and a small asyncpg pool for reads, compaction and metadata. A connection that
  broke (PostgreSQL restarted, backend terminated, network) is replaced: the pool does it on
  acquire, the writer is checked after any failed batch and reconnected. The batch in flight when a
  connection breaks fails (StoreError, cause chained): its COMMIT may or may not have happened, and
  only the caller can decide what to do with an update whose fate is unknown (Yjs updates are
  idempotent, so sending it again is always safe). Later appends succeed once the server answers.
* Group commit (``groupcommit.GroupCommitStore``): the flusher writes every queued append (up to
  MAX_BATCH_*) with ONE statement (``APPEND_BATCH``: lock the rooms, then ``INSERT ... SELECT FROM
  unnest(...) ORDER BY n RETURNING id`` and record new rooms), sent outside BEGIN/COMMIT so that it
  is its own transaction: one round trip per batch, durable when it returns. Rows get their ids in
  batch order (the sequence is read row by row in that order), so the sorted returned ids map back
  onto the batch.
* Ids come from one identity sequence (``CACHE 1``): unique, never reused. But sequences do not
  commit in order across transactions: two processes appending to one room could commit id 11
  before id 10, and a reader (load, compaction, ``history(after_id=...)``) that saw 11 would skip 10
  forever. So each batch first takes ``pg_advisory_xact_lock(APPEND, key(room))`` for every room in
  it, in ascending key order (no deadlock between batches sharing rooms), and only then draws ids.
  A room's writers are serialized until COMMIT, so its committed ids are always a prefix of its ids.
  Rooms whose keys collide (32-bit hash) merely share a lock.
* Compaction: one node at a time per room -- a session ``pg_try_advisory_lock(COMPACT, key(room))``;
  if another node (or task) holds it, ``compact`` returns False at once. Under the lock: read
  snapshot + tail in one statement, fold in a worker thread (the pool connection stays held, with no
  transaction open), then in one transaction upsert the snapshot only if ``upto_id`` is unchanged and
  prune history beyond ``history_keep`` rows at or below the new ``upto_id``. Rows above it are never
  touched, so a concurrent append from any node survives. Compactions per store are capped
  (``max_compactions``) so they never take the whole pool; the lock dies with its session, so a
  crashed compactor never blocks the room.
* Schema: created/migrated at ``open`` under ``pg_advisory_xact_lock(MIGRATE, key(schema))`` in one
  transaction, so processes starting together migrate one after another and the rest see it done.
  ``?schema=name`` puts the tables in their own schema (created if missing) via ``search_path``.
  Room and key columns use ``COLLATE "C"``: code point order, whatever the database's locale.
* Chat (``chat_*`` tables, schema version 2): each write is one transaction on a pool connection;
  read-modify-write (edit, reactions) locks the message row (``SELECT ... FOR UPDATE``).
* ``synchronous=NORMAL`` (the server's ``--sqlite-synchronous``) sets ``synchronous_commit=off`` on the
  writer: a commit then survives a crash of the collab process but not of the database server (up to
  ~3 x wal_writer_delay lost). ``FULL`` (default) keeps the server's setting (normally ``on``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import asyncpg

from .base import (
    DEFAULT_FOLD_CACHE_BYTES,
    DEFAULT_HISTORY_KEEP,
    FoldCache,
    MAX_META_KEYS,
    RoomRead,
    RoomState,
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
from .groupcommit import DEFAULT_COMMIT_INTERVAL, DEFAULT_MAX_PENDING, DEFAULT_MAX_PENDING_BYTES, GroupCommitStore, Pending

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        # CACHE 1: ids are drawn in order by whoever holds the room's append lock.
        # The primary key (room, id) is the only index: every read is "a room's rows by id".
        """CREATE TABLE updates (
               id     bigint GENERATED ALWAYS AS IDENTITY (CACHE 1),
               room   text COLLATE "C" NOT NULL,
               data   bytea NOT NULL,
               author text,
               ts     double precision NOT NULL,
               PRIMARY KEY (room, id)
           )""",
        """CREATE TABLE snapshots (
               room       text COLLATE "C" PRIMARY KEY,
               data       bytea NOT NULL,
               upto_id    bigint NOT NULL,
               updated_at double precision NOT NULL
           )""",
        """CREATE TABLE rooms (
               name       text COLLATE "C" PRIMARY KEY,
               created_at double precision NOT NULL
           )""",
        """CREATE TABLE meta (
               room       text COLLATE "C" NOT NULL,
               key        text COLLATE "C" NOT NULL,
               value      bytea NOT NULL,
               updated_at double precision NOT NULL,
               PRIMARY KEY (room, key)
           )""",
    ),
    2: (
        # Chat (storage.chat). Ids are server-made sortable strings: COLLATE "C" orders them bytewise.
        """CREATE TABLE chat_messages (
               room        text COLLATE "C" NOT NULL,
               id          text COLLATE "C" NOT NULL,
               author      text NOT NULL,
               author_name text NOT NULL,
               text        text NOT NULL,
               ts          double precision NOT NULL,
               reply_to    text COLLATE "C",
               anchor      text,
               mentions    text NOT NULL DEFAULT '[]',
               reactions   text NOT NULL DEFAULT '{}',
               edited_ts   double precision,
               deleted     boolean NOT NULL DEFAULT false,
               PRIMARY KEY (room, id)
           )""",
        """CREATE TABLE chat_mentions (
               user_id    text COLLATE "C" NOT NULL,
               room       text COLLATE "C" NOT NULL,
               message_id text COLLATE "C" NOT NULL,
               read       boolean NOT NULL DEFAULT false,
               PRIMARY KEY (user_id, room, message_id)
           )""",
        "CREATE INDEX chat_mentions_by_user ON chat_mentions (user_id, read, message_id)",
        """CREATE TABLE chat_users (
               room      text COLLATE "C" NOT NULL,
               user_id   text COLLATE "C" NOT NULL,
               name      text NOT NULL,
               last_seen double precision NOT NULL,
               PRIMARY KEY (room, user_id)
           )""",
    ),
}

# Advisory lock namespaces (first key of the two-int form; "col" + n), never to be changed: nodes
# running different versions must agree on them, and on ``lock_key``.
LOCK_MIGRATE = 0x636F6C00
LOCK_APPEND = 0x636F6C01
LOCK_COMPACT = 0x636F6C02
LOCK_META = 0x636F6C03

DEFAULT_POOL_SIZE = 4
DEFAULT_COMMAND_TIMEOUT = 30.0  # a statement (incl. waiting for a lock) fails after this long
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_MAX_COMPACTIONS = 2  # concurrent compactions per store, each holding one pool connection
CLOSE_TIMEOUT = 10.0  # close() waits this long for borrowed pool connections, then terminates
KNOWN_ROOMS_CACHE = 100_000
SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

# What asyncpg and the network raise; wrapped into StoreError (asyncio.TimeoutError is an OSError).
DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
)

# The session is gone (terminated, server restarted, socket closed): nothing ran, so a read may retry.
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # incl. ConnectionDoesNotExistError
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    ConnectionError,
)

T = TypeVar("T")

# The flusher's whole transaction as ONE statement, sent outside BEGIN/COMMIT: it is its own
# transaction, one round trip, committed when it returns. It locks the batch's rooms (ascending
# keys: batches sharing rooms cannot deadlock), and only then draws ids, in batch order, and records
# new rooms. "Only then" does not rest on the order PostgreSQL runs the parts of a statement in
# (unspecified for WITH): both inserts read their rows through a join with the one-row count over
# ``locked``, which cannot exist before every lock call in it has returned (MATERIALIZED: computed
# once, its volatile calls exactly once per key). Rows leave the ordinality scan in batch order and
# nextval() is evaluated above the ORDER BY, so the sorted ids map back onto the batch.
APPEND_BATCH = """
    WITH locked AS MATERIALIZED (
             SELECT pg_advisory_xact_lock($5, k) FROM unnest($6::int4[]) AS k),
         new_rooms AS (
             INSERT INTO rooms (name, created_at)
             SELECT r.name, $8 FROM (SELECT count(*) FROM locked) AS l, unnest($7::text[]) AS r (name)
             ON CONFLICT (name) DO NOTHING)
    INSERT INTO updates (room, data, author, ts)
    SELECT b.room, b.data, b.author, b.ts
      FROM (SELECT count(*) FROM locked) AS l,
           unnest($1::text[], $2::bytea[], $3::text[], $4::float8[])
           WITH ORDINALITY AS b (room, data, author, ts, n)
     ORDER BY b.n
    RETURNING id"""
# Snapshot (kind 0) and tail (kind 1) in one statement: one MVCC snapshot, one round trip.
READ_ROOM = """
    WITH s AS (SELECT data, upto_id FROM snapshots WHERE room = $1)
    SELECT 0 AS kind, upto_id AS id, data FROM s
    UNION ALL
    SELECT 1, u.id, u.data FROM updates u
     WHERE u.room = $1 AND u.id > coalesce((SELECT upto_id FROM s), 0)
    ORDER BY kind, id"""
# The upto_id check: the row is written only if it is still what this compaction read (0 = none).
UPSERT_SNAPSHOT = """
    INSERT INTO snapshots AS s (room, data, upto_id, updated_at) VALUES ($1, $2, $3, $4)
    ON CONFLICT (room) DO UPDATE
       SET data = excluded.data, upto_id = excluded.upto_id, updated_at = excluded.updated_at
     WHERE s.upto_id = $5"""
# Retention: keep the newest $3 rows with id <= $2 (the new upto_id); no cutoff row -> NULL -> none.
PRUNE = """
    DELETE FROM updates WHERE room = $1 AND id <= (
        SELECT id FROM updates WHERE room = $1 AND id <= $2 ORDER BY id DESC OFFSET $3 LIMIT 1)"""


def lock_key(*parts: str) -> int:
    """A stable signed 32-bit key for advisory locks (blake2b: same on every node and version)."""
    digest = hashlib.blake2b("\0".join(parts).encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresStore(GroupCommitStore):
    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_compactions: int = DEFAULT_MAX_COMPACTIONS,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        history_keep: int = DEFAULT_HISTORY_KEEP,
        fold_cache_bytes: int = DEFAULT_FOLD_CACHE_BYTES,
        commit_interval: float = DEFAULT_COMMIT_INTERVAL,
        synchronous: str = "FULL",
    ) -> None:
        if not dsn.startswith(("postgresql://", "postgres://")):
            raise ValueError("PostgresStore needs a postgresql:// URL")
        if schema is not None and not SCHEMA_NAME.fullmatch(schema):
            raise ValueError(f"schema must match {SCHEMA_NAME.pattern}, not {schema!r}")
        if pool_size < 1 or max_compactions < 1:
            raise ValueError("pool_size and max_compactions must be >= 1")
        if command_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("command_timeout and connect_timeout must be > 0")
        mode = synchronous.upper()
        if mode not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        super().__init__(max_pending=max_pending, max_pending_bytes=max_pending_bytes, commit_interval=commit_interval)
        self.dsn = dsn
        self.schema = schema
        self.pool_size = pool_size
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.synchronous = mode
        self.history_keep = check_history_keep(history_keep)
        self._folds = FoldCache(fold_cache_bytes)  # the Doc of each room's last fold, for its next one

        self._pool: asyncpg.Pool | None = None
        self._writer: asyncpg.Connection | None = None
        self._writer_suspect = False
        self._write_lock = asyncio.Lock()  # the writer: flusher batches and ping's health check
        self._compactions = asyncio.Semaphore(max_compactions)
        self._known_rooms: set[str] = set()
        self._namespace = schema or ""

    def __repr__(self) -> str:
        parts = urlsplit(self.dsn)
        host = parts.hostname or ""
        netloc = f"{parts.username}@{host}" if parts.username else host
        if parts.port:
            netloc += f":{parts.port}"
        safe = urlunsplit((parts.scheme, netloc, parts.path, "", ""))  # no password, no options
        return f"<PostgresStore {safe}{f' schema={self.schema}' if self.schema else ''} {self._state}>"

    # -- connections -------------------------------------------------------------------------

    def _server_settings(self, *, writer: bool) -> dict[str, str]:
        settings = {}
        if "application_name" not in dict(parse_qsl(urlsplit(self.dsn).query)):
            settings["application_name"] = "collab"  # unless the URL names this node
        if self.schema:
            settings["search_path"] = f'"{self.schema}"'
        if writer and self.synchronous == "NORMAL":
            settings["synchronous_commit"] = "off"
        return settings

    async def _connect_writer(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            self.dsn,
            timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
            server_settings=self._server_settings(writer=True),
        )

    async def _open_backend(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self.pool_size,
                timeout=self.connect_timeout,
                command_timeout=self.command_timeout,
                server_settings=self._server_settings(writer=False),
            )
            async with self._pool.acquire() as conn:
                await self._migrate(conn)
            self._writer = await self._connect_writer()
        except Exception as exc:
            await self._close_backend()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open PostgreSQL store {self!r}: {exc}") from exc
        except BaseException:
            await self._close_backend()
            raise

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            # Everyone opening this schema queues here; the first one creates, the others see it.
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, $2)", LOCK_MIGRATE, lock_key(self._namespace)
            )
            if self.schema:
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version int NOT NULL)")
            rows = await conn.fetch("SELECT version FROM schema_version")
            current = int(rows[0][0]) if rows else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"{self!r} has schema version {current}; this code knows up to {SCHEMA_VERSION}"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    await conn.execute(statement)
            if not rows:
                await conn.execute("INSERT INTO schema_version VALUES ($1)", SCHEMA_VERSION)
            elif current != SCHEMA_VERSION:
                await conn.execute("UPDATE schema_version SET version = $1", SCHEMA_VERSION)

    async def _close_backend(self) -> None:
        self._folds.clear()
        async with self._write_lock:
            writer, self._writer = self._writer, None
            if writer is not None:
                await _close_quietly(writer)
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
            except Exception:  # borrowed connections did not come back, or are broken
                log.warning("terminating the PostgreSQL pool of %r", self, exc_info=True)
                pool.terminate()

    @contextlib.asynccontextmanager
    async def _connection(self, what: str) -> AsyncIterator[asyncpg.Connection]:
        """A pool connection; database and network errors become StoreError."""
        self._check_open()
        pool = self._pool
        if pool is None:
            raise StoreError(f"{self!r} has no connection pool")
        try:
            async with pool.acquire() as conn:
                yield conn
        except StoreError:
            raise
        except DB_ERRORS as exc:
            raise StoreError(f"PostgreSQL {what} failed: {exc}") from exc

    async def _read(self, what: str, query: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run an idempotent read, on another connection if the one it got turns out dead.

        After PostgreSQL restarts (or terminates backends) every idle pooled connection is dead,
        but the pool only learns it when the event loop reads each socket's EOF; a query on one
        fails. A read is safe to repeat, so it retries -- at most once per pooled connection, and
        never when connecting itself failed (the server is down: fail fast).
        """
        attempts = self.pool_size + 1
        for attempt in range(1, attempts + 1):
            self._check_open()
            pool = self._pool
            if pool is None:
                raise StoreError(f"{self!r} has no connection pool")
            try:
                async with pool.acquire() as conn:
                    try:
                        return await query(conn)
                    except DB_ERRORS as exc:
                        if attempt == attempts or not await _lost(conn, exc):
                            raise
                        log.info("PostgreSQL %s: connection lost (%r), retrying", what, exc)
            except DB_ERRORS as exc:
                raise StoreError(f"PostgreSQL {what} failed: {exc}") from exc
        raise AssertionError("unreachable")

    async def _writable(self) -> asyncpg.Connection:
        """The writer connection; checked after a failed batch and replaced if broken."""
        writer = self._writer
        if writer is not None and (writer.is_closed() or self._writer_suspect):  # no round trip
            try:
                if writer.is_closed():
                    raise ConnectionError("closed")
                await writer.fetchval("SELECT 1", timeout=min(5.0, self.command_timeout))
            except Exception:
                log.warning("reconnecting the PostgreSQL writer of %r", self)
                self._writer = None
                await _close_quietly(writer)
        if self._writer is None:
            self._writer = await self._connect_writer()
        self._writer_suspect = False
        return self._writer

    # -- the flusher's transaction ---------------------------------------------------------

    async def _write_batch(self, batch: list[Pending]) -> list[int]:
        rooms = [p.room for p in batch]
        keys = sorted({lock_key(self._namespace, room) for room in rooms})
        new_rooms = sorted(set(rooms) - self._known_rooms)
        async with self._write_lock:
            conn = await self._writable()
            rows = await conn.fetch(
                APPEND_BATCH,
                rooms,
                [p.data for p in batch],
                [p.author for p in batch],
                [p.ts for p in batch],
                LOCK_APPEND,
                keys,
                new_rooms,
                time.time(),
            )
        if len(self._known_rooms) + len(new_rooms) > KNOWN_ROOMS_CACHE:
            self._known_rooms.clear()
        self._known_rooms.update(new_rooms)
        return sorted(int(row[0]) for row in rows)

    def _write_failed(self, exc: BaseException) -> None:
        self._writer_suspect = True

    # -- reads -------------------------------------------------------------------------------

    async def _read_room(self, room: str) -> RoomRead:
        rows = await self._read("load", lambda conn: conn.fetch(READ_ROOM, room))
        return _split_room(rows)

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
        sql = "SELECT id, data, author, ts FROM updates WHERE room = $1 AND id > $2"
        args: list[Any] = [room, max(0, after_id)]
        if before_id is not None:
            args.append(before_id)
            sql += f" AND id < ${len(args)}"
        if author is not None:
            args.append(author)
            sql += f" AND author = ${len(args)}"
        args.append(limit)
        sql += f" ORDER BY id LIMIT ${len(args)}"
        rows = await self._read("history", lambda conn: conn.fetch(sql, *args))
        return [
            StoredUpdate(id=int(i), room=room, data=bytes(d), author=a, ts=float(t))
            for i, d, a, t in rows
        ]

    async def rooms(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        upper = prefix_upper_bound(prefix) if prefix else None
        if upper is None:
            sql, args = "SELECT name FROM rooms WHERE name >= $1 ORDER BY name", [prefix]
        else:
            sql = "SELECT name FROM rooms WHERE name >= $1 AND name < $2 ORDER BY name"
            args = [prefix, upper]
        rows = await self._read("rooms", lambda conn: conn.fetch(sql, *args))
        return [row[0] for row in rows]

    async def ping(self) -> None:
        await self._read("ping", lambda conn: conn.fetchval("SELECT 1"))
        self._check_flusher()
        if self._writer_suspect:  # the last commit failed: can the writer reach the server again?
            try:
                async with self._write_lock:
                    await self._writable()
            except DB_ERRORS as exc:
                raise StoreError(f"PostgreSQL writer unavailable: {exc}") from exc

    # -- metadata ----------------------------------------------------------------------------

    async def get_meta(self, room: str, key: str) -> bytes | None:
        check_room(room)
        check_meta_key(key)
        value = await self._read(
            "get_meta",
            lambda conn: conn.fetchval(
                "SELECT value FROM meta WHERE room = $1 AND key = $2", room, key
            ),
        )
        return None if value is None else bytes(value)

    async def list_meta(self, room: str, prefix: str = "") -> dict[str, bytes]:
        check_room(room)
        check_meta_prefix(prefix)
        upper = prefix_upper_bound(prefix) if prefix else None
        sql = "SELECT key, value FROM meta WHERE room = $1 AND key >= $2"
        args = [room, prefix]
        if upper is not None:
            sql += " AND key < $3"
            args.append(upper)
        rows = await self._read("list_meta", lambda conn: conn.fetch(sql + " ORDER BY key", *args))
        return {row[0]: bytes(row[1]) for row in rows}

    async def put_meta(self, room: str, key: str, value: bytes | None) -> None:
        check_room(room)
        check_meta_key(key)
        check_meta_value(value)
        full = False
        async with self._connection("put_meta") as conn:
            async with conn.transaction():
                if value is None:
                    await conn.execute("DELETE FROM meta WHERE room = $1 AND key = $2", room, key)
                    return
                status = await conn.execute(
                    "UPDATE meta SET value = $3, updated_at = $4 WHERE room = $1 AND key = $2",
                    room,
                    key,
                    value,
                    time.time(),
                )
                if status == "UPDATE 0":
                    # A new key: count the room's keys with its meta lock held, so that writers on
                    # other nodes cannot both squeeze past the bound.
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock($1, $2)",
                        LOCK_META,
                        lock_key(self._namespace, room),
                    )
                    count = await conn.fetchval("SELECT count(*) FROM meta WHERE room = $1", room)
                    if count >= MAX_META_KEYS:
                        full = True
                    else:
                        await conn.execute(
                            "INSERT INTO meta (room, key, value, updated_at) VALUES ($1, $2, $3, $4)"
                            " ON CONFLICT (room, key) DO UPDATE"
                            " SET value = excluded.value, updated_at = excluded.updated_at",
                            room,
                            key,
                            value,
                            time.time(),
                        )
        if full:
            raise ValueError(f"room {room!r} already holds {MAX_META_KEYS} meta keys")

    # -- chat --------------------------------------------------------------------------------

    async def _chat_write(self, what: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``fn`` in one transaction on a pool connection, committed before returning."""
        try:
            async with self._connection(f"chat {what}") as conn:
                async with conn.transaction():
                    return await fn(conn)
        except _ChatConflict as conflict:
            raise ValueError(str(conflict)) from None

    async def chat_add(self, message: ChatMessage) -> None:
        check_chat_message(message)

        async def write(conn: asyncpg.Connection) -> None:
            status = await conn.execute(
                f"INSERT INTO chat_messages ({CHAT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,"
                " $11, $12) ON CONFLICT (room, id) DO NOTHING", *to_row(message))
            if status != "INSERT 0 1":
                raise _ChatConflict(f"message {message.id!r} already exists in {message.room!r}")
            if message.mentions:
                await conn.execute(
                    "INSERT INTO chat_mentions (user_id, room, message_id) SELECT u, $2, $3 FROM unnest($1::text[]) u"
                    " ON CONFLICT DO NOTHING", list(message.mentions), message.room, message.id)

        await self._chat_write("add", write)

    async def chat_get(self, room: str, message_id: str) -> ChatMessage | None:
        check_room(room)
        check_chat_id("message id", message_id)
        row = await self._read("chat_get", lambda conn: conn.fetchrow(
            f"SELECT {CHAT_COLUMNS} FROM chat_messages WHERE room = $1 AND id = $2", room, message_id))
        return None if row is None else from_row(row)

    async def chat_history(self, room: str, *, before: str | None = None, limit: int = 50) -> list[ChatMessage]:
        check_room(room)
        check_limit(limit)
        if before is not None:
            check_chat_id("before", before)
        sql = (f"SELECT {CHAT_COLUMNS} FROM chat_messages WHERE room = $1 AND ($2::text IS NULL OR id < $2)"
               " ORDER BY id DESC LIMIT $3")
        rows = await self._read("chat_history", lambda conn: conn.fetch(sql, room, before, limit))
        return [from_row(row) for row in reversed(rows)]

    @staticmethod
    async def _locked_message(conn: asyncpg.Connection, room: str, message_id: str) -> ChatMessage | None:
        row = await conn.fetchrow(
            f"SELECT {CHAT_COLUMNS} FROM chat_messages WHERE room = $1 AND id = $2 FOR UPDATE", room, message_id)
        return None if row is None else from_row(row)

    async def chat_edit(self, room: str, message_id: str, text: str, *, mentions: tuple[str, ...] = (),
                        edited_ts: float | None = None) -> ChatMessage | None:
        check_room(room)
        check_chat_id("message id", message_id)
        check_chat_text(text)
        check_mentions(mentions)
        stamp = time.time() if edited_ts is None else edited_ts

        async def write(conn: asyncpg.Connection) -> ChatMessage | None:
            current = await self._locked_message(conn, room, message_id)
            if current is None or current.deleted:
                return None
            await conn.execute(
                "UPDATE chat_messages SET text = $3, mentions = $4, edited_ts = $5 WHERE room = $1 AND id = $2",
                room, message_id, text, dump_mentions(mentions), stamp)
            await conn.execute(
                "DELETE FROM chat_mentions WHERE room = $1 AND message_id = $2 AND NOT (user_id = ANY($3::text[]))",
                room, message_id, list(mentions))
            await conn.execute(
                "INSERT INTO chat_mentions (user_id, room, message_id) SELECT u, $2, $3 FROM unnest($1::text[]) u"
                " ON CONFLICT DO NOTHING", list(mentions), room, message_id)
            return await self._locked_message(conn, room, message_id)

        return await self._chat_write("edit", write)

    async def chat_delete(self, room: str, message_id: str) -> ChatMessage | None:
        check_room(room)
        check_chat_id("message id", message_id)

        async def write(conn: asyncpg.Connection) -> ChatMessage | None:
            await conn.execute(
                "UPDATE chat_messages SET text = '', anchor = NULL, mentions = '[]', reactions = '{}', "
                "deleted = true WHERE room = $1 AND id = $2", room, message_id)
            await conn.execute("DELETE FROM chat_mentions WHERE room = $1 AND message_id = $2", room, message_id)
            return await self._locked_message(conn, room, message_id)

        return await self._chat_write("delete", write)

    async def chat_react(self, room: str, message_id: str, emoji: str, user: str) -> ChatMessage | None:
        check_room(room)
        check_chat_id("message id", message_id)
        check_emoji(emoji)
        check_user(user)

        async def write(conn: asyncpg.Connection) -> ChatMessage | None:
            current = await self._locked_message(conn, room, message_id)
            if current is None or current.deleted:
                return None
            try:
                reactions = toggle_reaction(current.reactions, emoji, user)
            except ValueError as exc:
                raise _ChatConflict(str(exc)) from None
            await conn.execute("UPDATE chat_messages SET reactions = $3 WHERE room = $1 AND id = $2",
                               room, message_id, dump_reactions(reactions))
            return await self._locked_message(conn, room, message_id)

        return await self._chat_write("react", write)

    async def chat_mentions(self, user: str, *, unread_only: bool = True, before: str | None = None,
                            limit: int = 100) -> list[ChatMention]:
        check_user(user)
        check_limit(limit)
        if before is not None:
            check_chat_id("before", before)
        columns = ", ".join(f"c.{c.strip()}" for c in CHAT_COLUMNS.split(","))
        sql = (f"SELECT m.read, {columns} FROM chat_mentions m JOIN chat_messages c "
               "ON c.room = m.room AND c.id = m.message_id WHERE m.user_id = $1"
               " AND (NOT $2 OR NOT m.read) AND ($3::text IS NULL OR m.message_id < $3)"
               " ORDER BY m.message_id DESC LIMIT $4")
        rows = await self._read("chat_mentions", lambda conn: conn.fetch(sql, user, unread_only, before, limit))
        return [ChatMention(user=user, read=bool(row[0]), message=from_row(tuple(row)[1:])) for row in rows]

    async def chat_mark_read(self, user: str, room: str, upto: str) -> int:
        check_user(user)
        check_room(room)
        check_chat_id("upto", upto)

        async def write(conn: asyncpg.Connection) -> int:
            status = await conn.execute(
                "UPDATE chat_mentions SET read = true WHERE user_id = $1 AND room = $2 AND message_id <= $3"
                " AND NOT read", user, room, upto)
            return int(status.split()[-1])

        return await self._chat_write("mark read", write)

    async def chat_put_users(self, users: Sequence[tuple[str, str, str]]) -> None:
        rows = checked_users(users)
        if not rows:
            return

        async def write(conn: asyncpg.Connection) -> None:
            await conn.executemany(
                "INSERT INTO chat_users (room, user_id, name, last_seen) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (room, user_id) DO UPDATE SET name = excluded.name, last_seen = excluded.last_seen",
                rows)

        await self._chat_write("put users", write)

    async def chat_users(self, room: str) -> dict[str, str]:
        check_room(room)
        rows = await self._read("chat_users", lambda conn: conn.fetch(
            "SELECT user_id, name FROM chat_users WHERE room = $1 ORDER BY user_id", room))
        return {row[0]: row[1] for row in rows}

    # -- compaction --------------------------------------------------------------------------

    async def compact(self, room: str) -> bool:
        check_room(room)
        self._check_open()
        key = lock_key(self._namespace, room)
        async with self._compactions, self._connection("compaction") as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", LOCK_COMPACT, key):
                return False  # another node (or task) is compacting this room right now
            try:
                snapshot, upto_id, tail = _split_room(await conn.fetch(READ_ROOM, room))
                if not tail:
                    return False
                new_upto_id = tail[-1][0]
                try:
                    folded = await asyncio.to_thread(self._folds.fold, room, snapshot, [d for _, d in tail])
                except Exception as exc:  # pycrdt refused a stored update: leave the rows alone
                    raise StoreError(f"cannot fold room {room!r}: {exc}") from exc
                async with conn.transaction():
                    status = await conn.execute(
                        UPSERT_SNAPSHOT, room, folded, new_upto_id, time.time(), upto_id
                    )
                    if status != "INSERT 0 1":
                        return False  # someone without the lock moved upto_id: theirs stands
                    await conn.execute(PRUNE, room, new_upto_id, self.history_keep)
                return True
            finally:
                if not conn.is_closed():
                    with contextlib.suppress(Exception):  # the pool's reset unlocks it anyway
                        await conn.execute("SELECT pg_advisory_unlock($1, $2)", LOCK_COMPACT, key)


class _ChatConflict(Exception):
    """A chat write refused for a reason the caller caused (duplicate id, too many reactions)."""


async def _lost(conn: asyncpg.Connection, exc: BaseException) -> bool:
    """Whether ``exc`` means the connection died (rather than the statement failing)."""
    if isinstance(exc, CONNECTION_LOST):
        return True
    await asyncio.sleep(0)  # one loop turn: a socket already at EOF is noticed and closed
    return conn.is_closed()


def _split_room(rows: list[Any]) -> RoomRead:
    snapshot: bytes | None = None
    upto_id = 0
    tail: list[tuple[int, bytes]] = []
    for kind, row_id, data in rows:
        if kind == 0:
            snapshot, upto_id = bytes(data), int(row_id)
        else:
            tail.append((int(row_id), bytes(data)))
    return snapshot, upto_id, tail


async def _close_quietly(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 5)
    except Exception:  # already broken: nothing left to release
        conn.terminate()
