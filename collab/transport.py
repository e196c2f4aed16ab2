"""The websocket edge: the only module that knows starlette/ASGI.

Each socket: authenticate → validate the room name → acquire the room → run one reader (this
task) and one writer (the connection's) in a task group. Every way out — bad input, a full
outbox, a token expiring, shutdown — ends in one place, ``_serve``'s ``finally``, which leaves the
room (broadcasting awareness removals) and sends the close code recorded on the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import unquote

from starlette.websockets import WebSocket, WebSocketDisconnect

from collab import closecodes, protocol, wsfast
from collab.auth import AccessDenied, authenticate, token_from
from collab.connection import Connection, ConnectionLimits
from collab.hub import Hub, RoomUnavailable
from collab.logs import get_logger
from collab.protocol import Message, ProtocolError

MAX_ROOM_NAME_BYTES = 512
# Websocket paths that are never rooms (served by features, or kept for them).
RESERVED_PATHS = ("signaling", "presence", "api", "_", "healthz", "readyz", "metrics", "r", "invite", "static")

log = get_logger("collab.ws")


def room_name_problem(name: str) -> str | None:
    if not name:
        return "empty room name"
    if len(name.encode("utf-8")) > MAX_ROOM_NAME_BYTES:
        return "room name too long"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        return "control character in room name"
    head = name.split("/", 1)[0]
    if head in RESERVED_PATHS or name.startswith("_"):
        return "reserved path"
    return None


class WebsocketEndpoint:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        s = hub.settings
        self.limits = protocol.Limits(
            max_frame_bytes=s.max_frame_bytes, max_depth=s.max_depth,
            max_awareness_entries=s.max_awareness_entries, max_awareness_state_bytes=s.max_awareness_state_bytes,
        )
        self.conn_limits = ConnectionLimits(
            outbox_max_bytes=s.outbox_max_bytes, outbox_max_frames=s.outbox_max_frames,
            rate_limit=s.rate_limit, rate_burst=s.rate_burst, max_inflight=s.max_inflight,
            max_inflight_bytes=s.max_inflight_bytes,
        )

    async def __call__(self, scope, receive, send) -> None:  # ASGI app for the room route
        ws = WebSocket(scope, receive, send)
        raw_path = scope.get("raw_path")
        name = unquote(raw_path.decode("latin-1")) if raw_path else scope["path"]
        name = name.split("?", 1)[0][1:]
        hub, settings = self.hub, self.hub.settings
        token, subprotocol = token_from(ws)
        problem = room_name_problem(name)
        try:
            identity = authenticate(settings.secret, token, name, ws.query_params.get("name"),
                                    ws.query_params.get("role"))
        except AccessDenied as denied:
            await self._refuse(ws, denied.code, denied.reason, subprotocol)
            return
        if problem:
            await self._refuse(ws, closecodes.BAD_MESSAGE, problem, subprotocol)
            return
        if not hub.accepting:
            await self._refuse(ws, closecodes.SERVER_RESTART, "server draining", subprotocol)
            return
        if len(hub.connections) >= settings.max_connections:
            await self._refuse(ws, closecodes.TRY_AGAIN_LATER, "server at capacity", subprotocol)
            return
        client = scope.get("client") or ("", 0)
        conn = Connection(identity, name, self.conn_limits, hub.metrics, hub.clock, peer=f"{client[0]}:{client[1]}")
        await ws.accept(subprotocol=subprotocol)
        hub.register(conn)
        try:
            room = None
            for _ in range(3):
                try:
                    room = await hub.acquire(name)
                except RoomUnavailable:
                    break
                if hub.rooms.get(name) is room and not room.poisoned:
                    break
                room = None
            if room is None:
                conn.close(closecodes.TRY_AGAIN_LATER, "room unavailable")
                await self._close(ws, conn)
                return
            await self._serve(ws, conn, room, scope, receive, send)
        finally:
            hub.unregister(conn)

    async def _refuse(self, ws: WebSocket, code: int, reason: str, subprotocol: str | None) -> None:
        # Accept first: a close before accept is an HTTP 403 that browsers report as 1006,
        # and then clients cannot tell "go away" from "try again".
        self.hub.metrics.closes.labels(code=str(code)).inc()
        log.info("connection refused", code=code, reason=reason)
        await ws.accept(subprotocol=subprotocol)
        await ws.close(code, reason)

    async def _serve(self, ws: WebSocket, conn: Connection, room, scope, receive, send) -> None:
        bind = log.bind(room=room.name, conn=conn.id, user=conn.identity.user_id)
        bind.info("connected", role=conn.identity.role, peer=conn.peer)
        fast = scope.get("extensions", {}).get(wsfast.SCOPE_KEY)
        writer: asyncio.Task[None] | None = None
        backlog: list[Message] = []  # a list: ~50 bytes per idle connection, not ~600
        if fast is not None:
            # Our own protocol: messages are handled inside data_received and frames written
            # from the loop; this task only sees what needs awaiting, and the disconnect.
            conn.attach_socket(fast)
            fast.attach(self._sink(conn, room, fast, backlog), conn.flush, room.doc.transaction)
        else:
            async def send_frame(frame: bytes) -> None:
                await send({"type": "websocket.send", "bytes": frame})

            # One extra task per connection, the writer; this task is the reader. The writer is
            # owned here: cancelled and awaited below, whatever ends the connection.
            writer = asyncio.get_running_loop().create_task(conn.write_loop(send_frame))
            writer.add_done_callback(lambda task: _writer_done(task, conn))
        room.join(conn)
        conn.bind_reader(asyncio.current_task())
        try:
            await self._read_loop(receive, conn, room, fast, backlog)
        finally:
            conn.bind_reader(None)  # from here on, a late close() must not cancel our cleanup
            if fast is not None:
                fast.detach()
                conn.attach_socket(None)
            if writer is not None:
                # Whatever ended the reader, nothing more goes out: a closing connection's outbox
                # is dropped, and the writer may be stuck on a client that stopped reading.
                writer.cancel()
                await asyncio.wait([writer])
            room.leave(conn)
            await self._close(ws, conn)
            bind.info("disconnected", code=conn.close_code, reason=conn.close_reason)

    def _admit(self, conn: Connection, data: bytes) -> bool:
        """Count a received message against the connection's rate limit (closing it, 1013, when
        over): False if it must not be handled."""
        self.hub.metrics.bytes_in.value += len(data)  # a LoopCounter: lock-free, event loop only
        now = self.hub.clock()
        conn.last_received = now
        if conn.bucket.take(now):
            return True
        conn.close(closecodes.TRY_AGAIN_LATER, "rate limit exceeded")
        return False

    def _sink(self, conn: Connection, room, fast: wsfast.FastWebSocketProtocol,
              backlog: list[Message]) -> Callable[[bytes], None]:
        """The synchronous handler ``FastWebSocketProtocol`` calls with each binary message.

        Handled on the spot when possible; otherwise — or while earlier messages wait — it goes
        to ``backlog``, reading pauses, and the reader task (``_drain``) takes over."""
        limits, admit = self.limits, self._admit

        def sink(data: bytes) -> None:
            if conn.close_code is not None or not admit(conn, data):
                return  # closing: nothing more is read
            try:
                message = protocol.decode(data, limits)
                if not backlog and room.handle_now(conn, message):
                    return
            except ProtocolError as exc:
                conn.close(exc.code, exc.reason)
                return
            except Exception:  # noqa: BLE001 - a bug must end this socket, not the server's loop
                log.exception("message handling failed", room=room.name, conn=conn.id)
                conn.close(closecodes.INTERNAL_ERROR, "internal error")
                return
            if not backlog:
                fast.wake_reader()
            backlog.append(message)  # behind whatever already waits
            fast.pause()

        return sink

    async def _drain(self, fast: wsfast.FastWebSocketProtocol, conn: Connection, room,
                     backlog: list[Message]) -> None:
        """Handle the backlog in order — awaiting only what must be awaited — then read again.
        The sink appends behind us meanwhile (the list stays non-empty until we are done)."""
        i = 0
        while i < len(backlog):
            message = backlog[i]
            if not room.handle_now(conn, message):  # no coroutine for what needs no waiting
                await room.handle_later(conn, message)
            i += 1
        backlog.clear()
        fast.resume()

    async def _read_loop(self, receive, conn: Connection, room, fast: wsfast.FastWebSocketProtocol | None = None,
                         backlog: list[Message] | None = None) -> None:
        try:
            while True:
                event = await receive()
                kind = event["type"]
                if kind == "websocket.disconnect":
                    conn.peer_closed = True
                    return
                if kind == wsfast.BACKLOG_EVENT:
                    assert fast is not None and backlog is not None
                    await self._drain(fast, conn, room, backlog)
                    continue
                # Not seen by the fast path's sink (another protocol, a text frame, a message
                # read before the sink was attached): charge and decode here.
                data = event.get("bytes")
                if data is None:
                    raise ProtocolError("text frames are not part of this protocol")
                if not self._admit(conn, data):
                    return
                await room.handle(conn, protocol.decode(data, self.limits))
        except ProtocolError as exc:
            conn.close(exc.code, exc.reason)
        except (WebSocketDisconnect, OSError, RuntimeError):
            conn.peer_closed = True  # the transport is gone
        except asyncio.CancelledError:
            if conn.close_code is None and not conn.peer_closed:
                raise  # not ours: the server itself is being cancelled
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # we asked for it (Connection.close); the handler goes on to close

    async def _close(self, ws: WebSocket, conn: Connection) -> None:
        if conn.peer_closed or conn.close_code is None:
            return
        try:
            async with asyncio.timeout(5):
                await ws.close(conn.close_code, conn.close_reason)
        except Exception:  # noqa: BLE001 - the socket may already be gone; nothing to tell
            pass


def _writer_done(task: asyncio.Task[None], conn: Connection) -> None:
    """The writer failed (the peer went away mid-send): stop the reader too."""
    if task.cancelled() or task.exception() is None:
        return
    conn.peer_closed = True
    conn.stop_reader()
