"""The room socket's hot path, below ASGI: frames in and out without a task hop per message.

uvicorn's websocket protocols hand every message to the app through an ASGI queue (one task
wake-up per message, and reading paused until the app takes it) and take every outgoing frame
as an awaited ``send`` (one more task per connection to drain an outbox). For a relay that is
most of the CPU per update. ``FastWebSocketProtocol`` is uvicorn's sans-I/O protocol with two
doors added for the room endpoint, which finds it in the ASGI scope after the handshake:

* ``attach(sink)``: each complete binary message goes to ``sink(data)`` inside
  ``data_received``, synchronously. What the sink cannot finish without awaiting (a service
  call, an update past its connection's in-flight bound) it keeps in a backlog of its own,
  calls ``pause()`` (no more reads: TCP backpressure) and ``wake_reader()``; the app's reader
  task drains the backlog — later messages join it, so order is kept — and calls ``resume()``.
  The backlog holds at most what the reads before the pause delivered.
* ``write_frames(frames)``: server→client binary frames (never masked, never compressed:
  per-message deflate is off for our sockets) written with one ``transport.write``. While the
  transport is over its high-water mark (``writable`` false) the caller keeps its frames and
  ``on_writable`` is called when it drains.

Everything else — handshake, ping/pong, close handshake, parser errors, the disconnect event —
stays uvicorn's and the websockets library's; data frames written here never interleave with
theirs mid-frame because every write is a whole frame.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

SCOPE_KEY = "collab.fast_socket"
BACKLOG_EVENT = "collab.backlog"

Sink = Callable[[bytes], Any]


def frame_header(length: int) -> bytes:
    """The header of an unmasked, final, binary websocket frame of ``length`` payload bytes."""
    if length < 126:
        return bytes((0x82, length))
    if length < 1 << 16:
        return bytes((0x82, 126)) + length.to_bytes(2, "big")
    return bytes((0x82, 127)) + length.to_bytes(8, "big")


class FastWebSocketProtocol(WebSocketsSansIOProtocol):
    sink: Sink | None = None
    on_writable: Callable[[], None] | None = None
    batch: Callable[[], AbstractContextManager[Any]] | None = None

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None and self.handshake_initiated and not self.close_sent:
            scope["extensions"][SCOPE_KEY] = self

    # -- incoming --------------------------------------------------------------------------

    def attach(self, sink: Sink, on_writable: Callable[[], None],
               batch: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        """``batch``: a context entered around each read's worth of messages (the room passes
        its document's transaction: a burst of updates is applied in one, not one each)."""
        self.sink = sink
        self.on_writable = on_writable
        self.batch = batch

    def detach(self) -> None:
        self.sink = None
        self.on_writable = None
        self.batch = None

    def data_received(self, data: bytes) -> None:
        batch = self.batch
        if batch is None:
            super().data_received(data)
        else:
            with batch():
                super().data_received(data)

    def send_receive_event_to_app(self) -> None:
        sink = self.sink
        if sink is None or self.close_sent or self.curr_msg_data_type != "bytes":
            super().send_receive_event_to_app()
            return
        frames = self.frames
        self.frames = []
        sink(frames[0] if len(frames) == 1 else b"".join(frames))

    def pause(self) -> None:
        """Stop reading from the socket (TCP backpressure) until ``resume``."""
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.read_paused and not self.disconnected:
            self.read_paused = False
            self.transport.resume_reading()

    def wake_reader(self) -> None:
        """Queue a ``collab.backlog`` event: the app's reader has messages to await."""
        self.queue.put_nowait({"type": BACKLOG_EVENT})  # type: ignore[typeddict-item]

    # -- outgoing --------------------------------------------------------------------------

    @property
    def writable_now(self) -> bool:
        return self.writable.is_set() and not self.close_sent and not self.disconnected

    def write_frames(self, frames: list[bytes]) -> None:
        parts: list[bytes] = []
        for frame in frames:
            parts.append(frame_header(len(frame)))
            parts.append(frame)
        self.transport.write(b"".join(parts))

    def resume_writing(self) -> None:
        super().resume_writing()
        callback = self.on_writable
        if callback is not None:
            callback()

    def connection_lost(self, exc: Exception | None) -> None:
        self.detach()
        super().connection_lost(exc)


def uvicorn_ws(ws_impl: str) -> Any:
    """What to pass as uvicorn's ``ws=``: our protocol for the default implementation."""
    return FastWebSocketProtocol if ws_impl == "websockets-sansio" else ws_impl
