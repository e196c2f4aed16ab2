"""The Python client SDK for editor plugins, tools, tests and benchmarks.

    from clients import CollabClient

    async with CollabClient("ws://127.0.0.1:1234", token=token) as client:
        room = await client.join("notes/a")          # returns once synced
        text = room.doc.get("text", type=pycrdt.Text)
        text += "hello"                               # local edits are sent
        room.presence.set({"user": {"name": "Ada"}})  # awareness
        state = await room.undo()                     # server-side, per-user undo

Theory of operation
-------------------
* One websocket per joined room, speaking stock y-websocket (sync, awareness) plus the server's
  extension messages (type 101, JSON bodies). ``room.doc`` is a pycrdt Doc: local transactions are
  sent as updates while connected; remote updates are applied.
* The connection is kept alive by one task per room. When it drops it reconnects with jittered
  exponential backoff (full jitter, ``backoff_initial`` doubling up to ``backoff_max``) and resyncs
  by state vector: it sends sync step 1 (what it has) and answers the server's step 1 with exactly
  what the server lacks — edits made while offline included. Nothing is sent twice, nothing lost.
* Close codes 4400–4499 are permanent refusals: they surface as typed exceptions
  (``Unauthorized``, ``Forbidden``, ``BadMessage``, ``TooLarge``) and stop retrying. Every other
  close (1006, 1011, 1012, 1013, …) is transient and retried.
* A connection that receives nothing for ``idle_timeout`` seconds (the server sends keepalives
  every 15 s) is considered dead and replaced, like y-websocket's 30 s watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Self

import pycrdt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from clients.chat import RoomChat
from clients.yclient import room_url
from collab import closecodes, protocol
from collab.protocol import AwarenessEntry

__all__ = [
    "BadMessage", "CollabClient", "CollabError", "ConnectionLost", "Forbidden", "Presence", "PresenceChange",
    "RequestFailed", "Room", "ServerClosed", "TooLarge", "Unauthorized", "UndoState",
]

log = logging.getLogger("clients.sdk")

Handler = Callable[[dict[str, Any]], Awaitable[None] | None]


# -- errors --------------------------------------------------------------------------------------


class CollabError(Exception):
    """Base class of every error this SDK raises."""


class ConnectionLost(CollabError):
    """The connection dropped (or never came up) before the operation completed; it is retried
    in the background, so the operation may simply be repeated."""


class ServerClosed(CollabError):
    """The server refused the connection for good (close code 4400–4499): no retry."""

    code: int = 0

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"server closed the connection with {code}: {reason or closecodes.DESCRIPTIONS.get(code, '')}")
        self.code = code
        self.reason = reason


class BadMessage(ServerClosed):
    """4400: the server rejected something this client sent, or the room name."""


class Unauthorized(ServerClosed):
    """4401: token missing, invalid or expired."""


class Forbidden(ServerClosed):
    """4403: the token does not allow this room."""


class TooLarge(ServerClosed):
    """4413: a frame or awareness state was over the server's limit."""


PERMANENT_CLOSES: dict[int, type[ServerClosed]] = {
    closecodes.BAD_MESSAGE: BadMessage,
    closecodes.UNAUTHORIZED: Unauthorized,
    closecodes.FORBIDDEN: Forbidden,
    closecodes.TOO_LARGE: TooLarge,
}


def closed_error(code: int, reason: str) -> ServerClosed | None:
    """The typed exception for a permanent close code, None for a transient one."""
    if 4400 <= code <= 4499:
        return PERMANENT_CLOSES.get(code, ServerClosed)(code, reason)
    return None


class RequestFailed(CollabError):
    """The server answered a request with ``{"type": "error", "code": ..., "message": ...}``."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.code = str(body.get("code", "error"))
        self.message = str(body.get("message", ""))
        super().__init__(f"{self.code}: {self.message}")


@dataclass(frozen=True, slots=True)
class UndoState:
    can_undo: bool = False
    can_redo: bool = False
    applied: bool = False  # in a reply: whether this undo/redo changed the document

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> UndoState:
        return cls(bool(body.get("can_undo")), bool(body.get("can_redo")), bool(body.get("applied")))


def full_jitter(attempt: int, initial: float, maximum: float) -> float:
    """Seconds to wait before reconnect ``attempt`` (0-based): uniform in [0, min(max, initial·2^n)]."""
    return random.uniform(0.0, min(maximum, initial * (2 ** min(attempt, 32))))


# -- presence ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PresenceChange:
    added: tuple[int, ...] = ()
    updated: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    local: bool = False  # caused by ``presence.set``

    def __bool__(self) -> bool:
        return bool(self.added or self.updated or self.removed)


class PresenceStream:
    """``async for change in presence.changes()``; registered when created, so nothing is missed."""

    def __init__(self, queues: set[asyncio.Queue[PresenceChange]]) -> None:
        self._queues = queues
        self._queue: asyncio.Queue[PresenceChange] = asyncio.Queue()
        queues.add(self._queue)

    def __aiter__(self) -> PresenceStream:
        return self

    async def __anext__(self) -> PresenceChange:
        if self._queue not in self._queues:
            raise StopAsyncIteration
        return await self._queue.get()

    async def aclose(self) -> None:
        self._queues.discard(self._queue)


class Presence:
    """Awareness for one room, following the y-protocols rules.

    ``set(state)`` publishes this client's state (any JSON value; None removes it);
    ``states`` maps every known clientID (this one included) to its state; ``on_change(cb)`` and
    ``async for change in presence.changes()`` report additions, updates and removals.
    States are renewed every ``renew_seconds``; remote ones not renewed for ``timeout`` vanish.
    """

    def __init__(self, client_id: int, send: Callable[[bytes], None], *, timeout: float = 30.0) -> None:
        self.client_id = client_id
        self.timeout = timeout
        self.renew_seconds = timeout / 2
        self._send = send
        self._local: Any = None
        self._clock = 0
        self._last_sent = 0.0
        self.states: dict[int, Any] = {}
        self._meta: dict[int, tuple[int, float]] = {}  # clientID -> (clock, when it last changed)
        self._callbacks: list[Callable[[PresenceChange], None]] = []
        self._queues: set[asyncio.Queue[PresenceChange]] = set()

    @property
    def state(self) -> Any:
        return self._local

    @property
    def remote(self) -> dict[int, Any]:
        return {cid: state for cid, state in self.states.items() if cid != self.client_id}

    def set(self, state: Any) -> None:
        known = self.client_id in self.states
        self._local = state
        self._clock += 1
        if state is None:
            self.states.pop(self.client_id, None)
        else:
            self.states[self.client_id] = state
        self._meta[self.client_id] = (self._clock, time.monotonic())
        self._announce()
        if state is None:
            change = PresenceChange(removed=(self.client_id,) if known else (), local=True)
        elif known:
            change = PresenceChange(updated=(self.client_id,), local=True)
        else:
            change = PresenceChange(added=(self.client_id,), local=True)
        self._emit(change)

    def clear(self) -> None:
        self.set(None)

    def on_change(self, callback: Callable[[PresenceChange], None]) -> Callable[[], None]:
        """Call ``callback(change)`` after every change; returns a function that unsubscribes."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def changes(self) -> PresenceStream:
        """Every change from the moment of this call, as an async iterator (``aclose()`` it)."""
        return PresenceStream(self._queues)

    # -- driven by the room ----------------------------------------------------------------------

    def _announce(self) -> None:
        self._last_sent = time.monotonic()
        self._send(self._frame(self._local))

    def _frame(self, state: Any) -> bytes:
        return protocol.encode_awareness([AwarenessEntry(self.client_id, self._clock, json.dumps(state))])

    def _connected(self) -> None:
        """A new connection: tell the room who we are again."""
        if self._local is not None:
            self._announce()

    def _apply(self, entries: list[tuple[int, int, str]]) -> None:
        now = time.monotonic()
        added, updated, removed = [], [], []
        for cid, clock, raw in entries:
            if cid == self.client_id:
                continue
            known = self._meta.get(cid)
            known_clock = known[0] if known else 0
            is_null = raw == "null"
            if not (clock > known_clock or (clock == known_clock and is_null and cid in self.states)):
                continue
            try:
                state = json.loads(raw)
            except ValueError:
                continue
            self._meta[cid] = (clock, now)
            if state is None:
                if cid in self.states:
                    del self.states[cid]
                    removed.append(cid)
            elif cid in self.states:
                if self.states[cid] != state:
                    updated.append(cid)
                self.states[cid] = state
            else:
                self.states[cid] = state
                added.append(cid)
        self._emit(PresenceChange(tuple(added), tuple(updated), tuple(removed)))

    def _tick(self) -> None:
        """Renew our state and expire silent remote states (called about once a second)."""
        now = time.monotonic()
        if self._local is not None and now - self._last_sent >= self.renew_seconds:
            self._clock += 1
            self._announce()
        stale = [cid for cid, (_, seen) in self._meta.items()
                 if cid != self.client_id and cid in self.states and now - seen >= self.timeout]
        for cid in stale:
            del self.states[cid]
        if stale:
            self._emit(PresenceChange(removed=tuple(stale)))

    def _forget_remote(self) -> None:
        """The connection is gone: remote states are no longer known."""
        gone = tuple(cid for cid in self.states if cid != self.client_id)
        for cid in gone:
            del self.states[cid]
        for cid in [cid for cid in self._meta if cid != self.client_id]:
            del self._meta[cid]  # the next connection re-sends every state at its current clock
        if gone:
            self._emit(PresenceChange(removed=gone))

    def _emit(self, change: PresenceChange) -> None:
        if not change:
            return
        for callback in list(self._callbacks):
            callback(change)
        for queue in self._queues:
            queue.put_nowait(change)


# -- rooms ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Session:
    ws: ClientConnection
    outbox: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)  # None: flush and stop
    writer: asyncio.Task[None] | None = None


class Room:
    """One joined room: ``doc`` kept in sync, ``presence``, undo/redo and extension messages."""

    def __init__(self, client: CollabClient, name: str, doc: pycrdt.Doc | None = None) -> None:
        self.client = client
        self.name = name
        self.doc = doc if doc is not None else pycrdt.Doc(client_id=random.getrandbits(32))
        self.url = room_url(client.url, name, client.query)
        self.presence = Presence(self.doc.client_id, self._send_frame)
        self.undo_state = UndoState()
        self.synced = asyncio.Event()
        self.closed = asyncio.Event()
        self.error: CollabError | None = None  # why the room stopped for good
        self.read_only_reason: str | None = None  # set if the server said our edits are not saved
        self.connects = 0
        self.synced_once_this_session = False
        self._session: _Session | None = None
        self._connected = asyncio.Event()
        self._changed = asyncio.Event()
        self._applying = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._handlers: dict[str, list[Handler]] = {}
        self._handler_tasks: set[asyncio.Task[Any]] = set()
        self._subscription = self.doc.observe(self._on_local_change)
        # Attached before connecting: the server pushes recent chat history as soon as we join.
        self.chat = RoomChat(self)

    def __repr__(self) -> str:
        return f"<Room {self.name!r} connected={self.connected} synced={self.synced.is_set()}>"

    @property
    def connected(self) -> bool:
        return self._session is not None

    def text(self, name: str = "text") -> pycrdt.Text:
        return self.doc.get(name, type=pycrdt.Text)

    # -- lifecycle -------------------------------------------------------------------------------

    def _start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"collab room {self.name}")

    async def wait_synced(self, timeout: float | None = 30.0) -> None:
        """Until the document is in sync with the server; raises the room's error if it stopped."""
        async def synced_or_stopped() -> None:
            while True:
                self._changed.clear()
                if self.synced.is_set():
                    return
                if self.error is not None:
                    raise self.error
                if self.closed.is_set():
                    raise ConnectionLost("room closed")
                await self._changed.wait()

        async with asyncio.timeout(timeout):
            await synced_or_stopped()

    async def close(self) -> None:
        """Leave the room: remove our presence, close the socket, stop reconnecting."""
        if self._closing:
            if self._task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
            return
        self._closing = True
        session = self._session
        if session is not None:
            with contextlib.suppress(Exception):
                if self.presence.state is not None:
                    self.presence._clock += 1
                    session.outbox.put_nowait(self.presence._frame(None))
                # Everything edited before close() reaches the server before the socket closes.
                session.outbox.put_nowait(None)
                if session.writer is not None:
                    await asyncio.wait_for(asyncio.shield(session.writer), 5)
                await session.ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for task in list(self._handler_tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            self.doc.unobserve(self._subscription)
        self.client._forget(self)
        self._stop(None)

    def _stop(self, error: CollabError | None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.closed.set()
        self._fail_pending(error or ConnectionLost("room closed"))
        self._changed.set()

    async def _run(self) -> None:
        try:
            await self._connect_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave joiners waiting forever
            log.exception("room connection task failed", extra={"room": self.name})
            self._stop(CollabError(f"connection task failed: {exc!r}"))

    async def _connect_loop(self) -> None:
        client = self.client
        attempt = 0
        while not self._closing:
            try:
                ws = await connect(self.url, open_timeout=client.open_timeout, max_size=client.max_size,
                                   compression=None, proxy=None, ping_interval=20, ping_timeout=20,
                                   close_timeout=5)
            except (InvalidURI, ValueError) as exc:
                self._stop(CollabError(f"bad server URL {self.url!r}: {exc}"))
                return
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                if not client.reconnect:
                    self._stop(ConnectionLost(f"cannot connect to {self.url}: {exc}"))
                    return
                await asyncio.sleep(full_jitter(attempt, client.backoff_initial, client.backoff_max))
                attempt += 1
                continue
            code, reason = await self._serve(ws)
            if self._closing:
                return
            error = closed_error(code, reason)
            if error is not None:
                self._stop(error)
                return
            if not client.reconnect:
                self._stop(ConnectionLost(f"connection closed with {code}: {reason}"))
                return
            if self.synced_once_this_session:
                attempt = 0  # a healthy session ended: start the backoff over
            await asyncio.sleep(full_jitter(attempt, client.backoff_initial, client.backoff_max))
            attempt += 1

    async def _serve(self, ws: ClientConnection) -> tuple[int, str]:
        session = _Session(ws)
        self._session = session
        self.synced_once_this_session = False
        self.connects += 1
        session.outbox.put_nowait(protocol.encode_sync_step1(self.doc.get_state()))
        self.presence._connected()
        if self.client.track_undo:
            session.outbox.put_nowait(protocol.encode_extension({"type": "undo.state"}))
        self._connected.set()
        self._changed.set()
        writer = session.writer = asyncio.create_task(self._write(session))
        ticker = asyncio.create_task(self._tick())
        try:
            while True:
                async with asyncio.timeout(self.client.idle_timeout):
                    frame = await ws.recv()
                if isinstance(frame, bytes):
                    try:
                        self._handle(frame)
                    except Exception:
                        log.warning("dropped a frame this client could not handle", exc_info=True,
                                    extra={"room": self.name})
        except TimeoutError:
            with contextlib.suppress(Exception):
                await ws.close(closecodes.NORMAL, "no message for too long")
        except ConnectionClosed:
            pass
        finally:
            self._session = None
            self._connected.clear()
            self.synced.clear()
            writer.cancel()
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ticker
            self._fail_pending(ConnectionLost("connection lost before the reply"))
            self.presence._forget_remote()
            self._changed.set()
        received = ws.protocol.close_rcvd
        if received is None:
            return 1006, "connection dropped"
        return received.code, received.reason

    async def _write(self, session: _Session) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await session.outbox.get()
                if frame is None:
                    return
                await session.ws.send(frame)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.presence._tick()

    # -- sending ---------------------------------------------------------------------------------

    def _send_frame(self, frame: bytes) -> None:
        session = self._session
        if session is not None:
            session.outbox.put_nowait(frame)

    def _on_local_change(self, event: Any) -> None:
        if self._applying:
            return
        # While offline the change stays in the doc; the resync after reconnecting sends it.
        self._send_frame(protocol.encode_update(bytes(event.update)))

    async def send(self, body: dict[str, Any]) -> None:
        """Send one extension message (a JSON object with a string "type"); no reply expected."""
        if self.error is not None:
            raise self.error
        if not isinstance(body.get("type"), str):
            raise TypeError("an extension message needs a string 'type'")
        session = self._session
        if session is None:
            raise ConnectionLost("not connected")
        session.outbox.put_nowait(protocol.encode_extension(body))

    async def request(self, body: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
        """Send an extension message with a fresh request id and return the server's reply.

        Waits for a connection first (up to ``timeout``). Raises ``RequestFailed`` for an error
        reply, ``ConnectionLost`` if the socket dropped before the reply, the room's typed error
        if it was refused for good, TimeoutError if no reply came.
        """
        async with asyncio.timeout(timeout):
            while True:
                self._changed.clear()
                if self.error is not None:
                    raise self.error
                if self.closed.is_set():
                    raise ConnectionLost("room closed")
                if self._session is not None:
                    break
                await self._changed.wait()
            request_id = next(self._ids)
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._pending[request_id] = (str(body.get("type")), future)
            try:
                await self.send({**body, "id": request_id})
                return await future
            finally:
                self._pending.pop(request_id, None)

    async def undo(self, *, timeout: float = 10.0) -> UndoState:
        """Revert this user's most recent change group in this room (server-side, any client)."""
        return self._undo_reply(await self.request({"type": "undo"}, timeout=timeout))

    async def redo(self, *, timeout: float = 10.0) -> UndoState:
        return self._undo_reply(await self.request({"type": "redo"}, timeout=timeout))

    async def refresh_undo_state(self, *, timeout: float = 10.0) -> UndoState:
        return self._undo_reply(await self.request({"type": "undo.state"}, timeout=timeout))

    def _undo_reply(self, body: dict[str, Any]) -> UndoState:
        state = UndoState.from_body(body)
        self.undo_state = UndoState(state.can_undo, state.can_redo)
        return state

    def on(self, kind: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler(body)`` (sync or async) for every message of type ``kind`` the server
        pushes (replies to ``request`` go to the requester only). Returns an unsubscribe function."""
        handlers = self._handlers.setdefault(kind, [])
        handlers.append(handler)
        return lambda: handlers.remove(handler) if handler in handlers else None

    # -- receiving -------------------------------------------------------------------------------

    def _apply_remote(self, update: bytes) -> None:
        self._applying = True
        try:
            self.doc.apply_update(update)
        finally:
            self._applying = False

    def _handle(self, frame: bytes) -> None:
        msg_type, pos = protocol.read_var_uint(frame, 0)
        if msg_type == protocol.MSG_SYNC:
            sub, pos = protocol.read_var_uint(frame, pos)
            payload, _ = protocol.read_var_bytes(frame, pos)
            if sub == protocol.SYNC_STEP1:
                # Exactly what the server lacks: after a reconnect, the edits made offline.
                self._send_frame(protocol.encode_sync_step2(self.doc.get_update(payload)))
            elif sub == protocol.SYNC_STEP2:
                self._apply_remote(payload)
                self.synced_once_this_session = True
                self.synced.set()
                self._changed.set()
            elif sub == protocol.SYNC_UPDATE:
                self._apply_remote(payload)
        elif msg_type == protocol.MSG_AWARENESS:
            payload, _ = protocol.read_var_bytes(frame, pos)
            self.presence._apply(_awareness_entries(payload))
        elif msg_type == protocol.MSG_AUTH:
            _denied, p = protocol.read_var_uint(frame, pos)
            self.read_only_reason, _ = protocol.read_var_string(frame, p)
        elif msg_type == protocol.MSG_QUERY_AWARENESS:
            self.presence._connected()
        elif msg_type == protocol.MSG_EXTENSION:
            payload, _ = protocol.read_var_bytes(frame, pos)
            try:
                body = json.loads(payload)
            except ValueError:
                return
            if isinstance(body, dict):
                self._extension(body)

    def _extension(self, body: dict[str, Any]) -> None:
        kind = body.get("type")
        request_id = body.get("id")
        if kind == "undo.state":
            self.undo_state = UndoState(bool(body.get("can_undo")), bool(body.get("can_redo")))
        if request_id is not None and request_id in self._pending:
            _, future = self._pending[request_id]
            if not future.done():
                if kind == "error":
                    future.set_exception(RequestFailed(body))
                else:
                    future.set_result(body)
            return
        if kind == "error" and request_id is None and body.get("ref"):
            # Errors the server raises before any service sees the request carry no id, only the
            # type they refer to: they answer the oldest request of that type.
            for _, (pending_kind, future) in sorted(self._pending.items()):
                if pending_kind == body["ref"] and not future.done():
                    future.set_exception(RequestFailed(body))
                    return
        for handler in list(self._handlers.get(str(kind), ())):
            result = handler(body)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._handler_tasks.add(task)
                task.add_done_callback(self._handler_tasks.discard)

    def _fail_pending(self, error: CollabError) -> None:
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(error)


def _awareness_entries(payload: bytes) -> list[tuple[int, int, str]]:
    count, pos = protocol.read_var_uint(payload, 0)
    entries = []
    for _ in range(count):
        client_id, pos = protocol.read_var_uint(payload, pos)
        clock, pos = protocol.read_var_uint(payload, pos)
        state, pos = protocol.read_var_string(payload, pos)
        entries.append((client_id, clock, state))
    return entries


# -- the client ----------------------------------------------------------------------------------


class CollabClient:
    """Connections to one server (or load balancer) with one identity.

    ``url``: the server's websocket base URL (``ws://host:port``); ``token``: the access token
    (sent as ``?token=``); ``params``: more query parameters; ``reconnect``: keep reconnecting
    after transient closes (with full-jitter backoff from ``backoff_initial`` doubling up to
    ``backoff_max`` seconds); ``track_undo``: ask each room's server for undo/redo state pushes
    on connect (``room.undo_state``); tools that never undo (load tests) may turn it off.
    """

    def __init__(self, url: str, token: str | None = None, *, params: dict[str, str] | None = None,
                 reconnect: bool = True, backoff_initial: float = 0.1, backoff_max: float = 5.0,
                 open_timeout: float = 10.0, idle_timeout: float = 30.0, track_undo: bool = True,
                 max_size: int | None = 64 * 1024 * 1024) -> None:
        self.url = url.rstrip("/")
        self.query = dict(params or {})
        if token:
            self.query["token"] = token
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.open_timeout = open_timeout
        self.idle_timeout = idle_timeout
        self.max_size = max_size
        self.track_undo = track_undo
        self.rooms: dict[str, Room] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def join(self, room: str, *, doc: pycrdt.Doc | None = None, timeout: float | None = 30.0) -> Room:
        """Connect to ``room`` and return it once its document is synced.

        Raises ``Unauthorized``/``Forbidden``/… if the server refuses, TimeoutError if not synced
        within ``timeout`` (the room is closed then).
        """
        if room in self.rooms:
            raise ValueError(f"already joined {room!r}")
        joined = Room(self, room, doc)
        self.rooms[room] = joined
        joined._start()
        try:
            await joined.wait_synced(timeout)
        except BaseException:
            await joined.close()
            raise
        return joined

    async def close(self) -> None:
        for room in list(self.rooms.values()):
            await room.close()

    def _forget(self, room: Room) -> None:
        if self.rooms.get(room.name) is room:
            del self.rooms[room.name]
