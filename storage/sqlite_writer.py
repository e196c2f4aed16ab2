"""The SQLite group commit in a process of its own: no GIL between a commit and the event loop.

Why a process
-------------
A group commit on the writer connection's thread needs the GIL to start, and again after every
statement (the sqlite3 module lets it go around each step). A busy event loop hands the GIL back
only every switch interval (5 ms), so on a loaded server a commit that does 0.9 ms of work took
6 ms, and every update waits for its commit before it is relayed. A child process has its own
interpreter: it is scheduled by the kernel the moment its socket is readable, and the loop learns of
the commit from the same socket, in its own I/O callback (at 12,500 updates/s on a 2-core host:
commit 6.2 -> 4.0 ms, p99 78 -> 49 ms; the README has the runs).

How
---
* ``WriterProcess.start`` runs this file as a script (``python sqlite_writer.py FD PATH ...``: only
  the standard library and msgpack, none of the server's packages) with one end of a Unix
  socketpair as FD. The child opens its own connection to the store's main file with the same
  pragmas as the store's writer, says ``ready``, and then serves requests, one at a time, in order.
* A request is one batch: ``[seq, rows, new_rooms, now, delete_upto]``, written by
  ``insert_batch`` exactly as the store's own writer thread would (one transaction). The reply is
  ``[seq, last_id, None]`` after COMMIT, or ``[seq, None, "error text"]`` after a rollback.
  Frames are a 4-byte big-endian length and a msgpack body.
* The store keeps its in-process writer connection: chat, metadata, migrations and any batch
  written while the child is gone use it. SQLite's file lock orders the two writers, as it does
  for several server processes sharing a file.
* The child exits on EOF (the store closed its end, or the server died: even ``kill -9`` of the
  server ends it) and ignores SIGINT, so a Ctrl-C to the terminal's process group cannot cut a
  batch in half: the server drains, then closes the socket.
* If the child dies, every batch it held fails (``StoreError``: the rooms are poisoned and
  reloaded, as for any failed commit; a batch may in fact have committed before the child died,
  and the clients' re-sync then stores those updates again, which Yjs ignores as duplicates).
  The store writes in-process meanwhile and starts a new child.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

_LEN = struct.Struct(">I")
# A request holds at most MAX_BATCH_BYTES (16 MiB) of updates plus their rooms and authors.
MAX_FRAME = 64 * 1024 * 1024

INSERT_CHUNK = 256  # rows per multi-row INSERT: 1,024 parameters (SQLite allows 32,766)
# A connection's prepared-statement cache: one multi-row INSERT per batch size seen, plus the rest.
WRITER_CACHED_STATEMENTS = INSERT_CHUNK + 64


class BatchError(Exception):
    """A batch's statements ran but did not insert what they should have."""


_INSERT_SQL: dict[int, str] = {}


def insert_sql(n: int) -> str:
    sql = _INSERT_SQL.get(n)
    if sql is None:
        sql = _INSERT_SQL[n] = "INSERT INTO recent (room, data, author, ts) VALUES " + ",".join(["(?, ?, ?, ?)"] * n)
    return sql


def rollback_quietly(conn: sqlite3.Connection) -> None:
    """End the current transaction, if any; never raises (the connection may be broken)."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except Exception:
        pass


def insert_batch(
    conn: sqlite3.Connection, rows: Sequence[Sequence[Any]], new_rooms: Sequence[str], now: float,
    delete_upto: int = 0,
) -> int:
    """The group commit's transaction: the rows (room, data, author, ts), their rooms; the last
    row's id. ``delete_upto``: also delete the rows of ``recent`` up to that id (a merge copied them
    to the archive).

    Run on the store's writer thread, the sqlite3 module releases the GIL around every statement
    step and must take it back after; on a busy server each re-take waits for the event loop to let
    go (up to the switch interval, 5 ms). So a batch is as few statements as possible: up to
    INSERT_CHUNK rows and no new room is ONE multi-row INSERT run as its own (autocommit)
    transaction -- it takes the write lock at its start and waits on the busy handler like BEGIN
    IMMEDIATE -- and anything bigger is chunks of INSERT_CHUNK rows in one BEGIN IMMEDIATE
    transaction. With the write lock held, one transaction's rows get consecutive ids."""
    if not new_rooms and not delete_upto and len(rows) <= INSERT_CHUNK:
        try:
            cursor = conn.execute(insert_sql(len(rows)), [value for row in rows for value in row])
        except BaseException:
            rollback_quietly(conn)
            raise
        if cursor.rowcount != len(rows) or cursor.lastrowid is None:
            raise BatchError(f"inserted {cursor.rowcount} rows of {len(rows)}")
        return int(cursor.lastrowid)
    conn.execute("BEGIN IMMEDIATE")
    try:
        inserted = 0
        last_id = None
        for start in range(0, len(rows), INSERT_CHUNK):
            chunk = rows[start:start + INSERT_CHUNK]
            cursor = conn.execute(insert_sql(len(chunk)), [value for row in chunk for value in row])
            inserted += cursor.rowcount
            last_id = cursor.lastrowid
        if inserted != len(rows) or last_id is None:
            raise BatchError(f"inserted {inserted} rows of {len(rows)}")
        if new_rooms:
            conn.executemany(
                "INSERT OR IGNORE INTO rooms (name, created_at) VALUES (?, ?)", [(name, now) for name in new_rooms]
            )
        if delete_upto:
            conn.execute("DELETE FROM recent WHERE id <= ?", (delete_upto,))
        conn.execute("COMMIT")
    except BaseException:
        rollback_quietly(conn)
        raise
    return int(last_id)


def connect(path: str, synchronous: str, busy_timeout_ms: int, journal_size_limit: int) -> sqlite3.Connection:
    """A writer connection to the store's main file, with the store's pragmas (WAL must already be
    on: the store set it when it opened the file)."""
    conn = sqlite3.connect(path, isolation_level=None, cached_statements=WRITER_CACHED_STATEMENTS)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        mode = conn.execute("PRAGMA journal_mode").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise sqlite3.OperationalError(f"{path!r} is not in WAL mode ({mode})")
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute(f"PRAGMA journal_size_limit = {int(journal_size_limit)}")
    except BaseException:
        conn.close()
        raise
    return conn


def pack(message: Any) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _LEN.pack(len(body)) + body


# -- the child -------------------------------------------------------------------------------------


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None at EOF before the first of them (EOF inside a frame is an error)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise EOFError("the store closed the socket inside a frame")
        got += k
    return bytes(buf)


def serve(sock: socket.socket, conn: sqlite3.Connection) -> None:
    """Answer batches until EOF."""
    while True:
        head = _recv_exactly(sock, _LEN.size)
        if head is None:
            return
        (size,) = _LEN.unpack(head)
        if size > MAX_FRAME:
            raise ValueError(f"request of {size} bytes")
        body = _recv_exactly(sock, size)
        if body is None:
            raise EOFError("the store closed the socket inside a frame")
        seq, rows, new_rooms, now, delete_upto = msgpack.unpackb(body, raw=False)
        try:
            last_id = insert_batch(conn, rows, new_rooms, now, delete_upto)
        except Exception as exc:  # noqa: BLE001 - reported to the store, which fails the batch
            reply = [seq, None, f"{type(exc).__name__}: {exc}"]
        else:
            reply = [seq, last_id, None]
        sock.sendall(pack(reply))


def main(argv: list[str]) -> int:
    fd, path, synchronous, busy_timeout_ms, journal_size_limit = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when we stop: EOF
    sock = socket.socket(fileno=int(fd))
    try:
        conn = connect(path, synchronous, int(busy_timeout_ms), int(journal_size_limit))
    except Exception as exc:  # noqa: BLE001 - told to the store, which writes in-process instead
        sock.sendall(pack(["failed", f"{type(exc).__name__}: {exc}"]))
        return 1
    try:
        sock.sendall(pack(["ready", os.getpid()]))
        serve(sock, conn)
    finally:
        conn.close()
    return 0


# -- the store's side ------------------------------------------------------------------------------

Done = Callable[[int | None, BaseException | None], None]


class WriterGone(Exception):
    """The writer process exited (or its socket broke) before it answered."""


class WriterProcess(asyncio.Protocol):
    """The store's handle on its writer process: ``submit`` a batch, get ``done(last_id, None)`` or
    ``done(None, error)`` on the event loop, straight from the socket's I/O callback, in order.
    ``alive`` turns False for good when the socket closes; ``close`` ends the process."""

    def __init__(self, proc: subprocess.Popen[bytes], ready: asyncio.Future[int]) -> None:
        self.proc = proc
        self._ready = ready
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiting: deque[tuple[int, Done]] = deque()
        self._seq = 0
        self.alive = False

    @classmethod
    async def start(cls, path: str, synchronous: str, busy_timeout: float, journal_size_limit: int,
                    *, timeout: float = 10.0) -> WriterProcess:
        """Start the child and wait until it has its connection; raises (and leaves nothing
        running) if it cannot."""
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), str(child.fileno()), str(path), synchronous,
                 str(int(busy_timeout * 1000)), str(journal_size_limit)],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, close_fds=True,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self = cls(proc, loop.create_future())
        try:
            parent.setblocking(False)
            await loop.create_unix_connection(lambda: self, sock=parent)
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except BaseException:
            self._ready.cancel()  # nobody waits for it any more: _lost must not leave an error in it
            await self.close()  # closes the transport (and with it the socket), reaps the child
            parent.close()  # if no transport took the socket
            raise
        return self

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        self.alive = True

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= _LEN.size:
            (size,) = _LEN.unpack_from(buffer, start)
            end = start + _LEN.size + size
            if len(buffer) < end:
                break
            message = msgpack.unpackb(memoryview(buffer)[start + _LEN.size:end], raw=False)
            start = end
            self._answer(message)
        del buffer[:start]

    def _answer(self, message: list[Any]) -> None:
        if not self._ready.done():
            if message[0] == "ready":
                self._ready.set_result(int(message[1]))
            else:
                self._ready.set_exception(WriterGone(f"the SQLite writer process could not start: {message[1]}"))
            return
        seq, last_id, error = message
        expected, done = self._waiting.popleft()
        if seq != expected:  # cannot happen: one socket, answered in order
            self._lost(WriterGone(f"the SQLite writer process answered batch {seq}, expected {expected}"))
            done(None, WriterGone("the SQLite writer process answered out of order"))
            return
        if error is None:
            done(int(last_id), None)
        else:
            done(None, sqlite3.DatabaseError(error))

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(WriterGone(f"the SQLite writer process exited ({exc or 'socket closed'})"))

    def _lost(self, error: WriterGone) -> None:
        self.alive = False
        if self._transport is not None:
            self._transport.abort()
        if not self._ready.done():
            self._ready.set_exception(error)
        waiting, self._waiting = self._waiting, deque()
        for _seq, done in waiting:
            done(None, error)

    # -- the store's calls --------------------------------------------------------------------

    def submit(self, rows: Sequence[Sequence[Any]], new_rooms: Sequence[str], now: float, delete_upto: int,
               done: Done) -> None:
        """Send a batch; ``done`` is called once, on the loop, with its last id or an error."""
        if not self.alive or self._transport is None:
            raise WriterGone("the SQLite writer process is not running")
        self._seq += 1
        self._waiting.append((self._seq, done))
        self._transport.write(pack([self._seq, rows, new_rooms, now, delete_upto]))

    async def close(self, timeout: float = 10.0) -> None:
        """Close the socket (the child finishes what it has, then exits on EOF) and reap it;
        killed if it is still there after ``timeout``."""
        if self._transport is not None:
            self._transport.close()
        self.alive = False
        try:
            await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
