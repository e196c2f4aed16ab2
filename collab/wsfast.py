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
* ``write_wire(frames)``: server→client binary frames, each already a whole websocket frame
  (``wire_frame``: never masked, never compressed — per-message deflate is off for our
  sockets), written with one ``transport.write``. A relayed update's frame is built once and
  shared by every member (``write_frame``: one such frame, the relay of a lone update). While
  the transport is over its high-water mark (``writable`` false) the caller keeps its frames
  and ``on_writable`` is called when it drains.

Frames in are cut by us (``_receive``) once the connection is open: a final, masked binary
frame within the size limit — every message a Yjs client sends — is unmasked and given to the
sink right here; any other *complete* frame (ping, pong, close, text, a fragment, anything
malformed) is handed, exactly that frame's bytes, to the websockets library's parser, which
therefore always stops at a frame boundary and keeps all of its checks and close codes. A
frame over the size limit is handed over as it arrives (websockets closes with 1009), and from
then on everything goes to websockets. Bytes of a frame not yet complete wait in our buffer,
which a frame within the limit bounds.

Everything else — handshake, ping/pong, close handshake, parser errors, the disconnect event —
stays uvicorn's and the websockets library's; data frames written here never interleave with
theirs mid-frame because every write is a whole frame.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the C extension is built for every platform we run on
    from websockets.utils import apply_mask

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


def wire_frame(payload: bytes) -> bytes:
    """``payload`` as a whole unmasked, final, binary websocket frame."""
    return frame_header(len(payload)) + payload


def wire_payload(frame: bytes) -> bytes:
    """The payload of a frame made by ``wire_frame``."""
    length = frame[1]
    return frame[2 + (2 if length == 126 else 8 if length == 127 else 0):]


class FastWebSocketProtocol(WebSocketsSansIOProtocol):
    sink: Sink | None = None
    on_writable: Callable[[], None] | None = None
    batch: Callable[[], AbstractContextManager[Any]] | None = None
    # None until the connection is open; then True while we cut frames ourselves, False once
    # everything goes to websockets' parser (it saw part of a frame, or a frame over the limit).
    own_framing: bool | None = None
    partial: bytearray | None = None  # the start of a frame not yet complete
    need = 0  # how long ``partial`` must grow before it holds the whole frame (0: header unread)
    _opened: AbstractContextManager[Any] | None = None  # ``batch`` entered for the current read
    # The transport is over its high-water mark: uvicorn's ``writable`` event, cleared, as a plain
    # attribute (read for every frame a relay writes: no method call).
    write_paused = False

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None and self.handshake_initiated and not self.close_sent:
            scope["extensions"][SCOPE_KEY] = self

    # -- incoming --------------------------------------------------------------------------

    def attach(self, sink: Sink, on_writable: Callable[[], None],
               batch: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        """``batch``: a context entered when one read holds more than one message, from the
        second on, to the end of the read (the room passes its document's transaction: a burst
        of updates is applied in one, not one each; a lone message needs none)."""
        self.sink = sink
        self.on_writable = on_writable
        self.batch = batch

    def detach(self) -> None:
        self.sink = None
        self.on_writable = None
        self.batch = None

    def data_received(self, data: bytes) -> None:
        if self.own_framing is None:
            if self.conn.state is not State.OPEN:
                super().data_received(data)  # the handshake
                return
            # Cut frames ourselves only if websockets holds nothing of one (a client that sent
            # frames before the handshake's answer may have left it mid-frame).
            self.own_framing = not self.conn.reader.buffer
        if not self.own_framing:
            super().data_received(data)
            return
        partial = self.partial
        if partial is not None:
            partial += data
            if len(partial) < self.need:
                return  # a frame arriving in pieces is copied once, when complete
            data = bytes(partial)
            self.partial = None
        try:
            self._receive(data)
        finally:
            opened = self._opened
            if opened is not None:
                self._opened = None
                opened.__exit__(None, None, None)

    def _receive(self, data: bytes) -> None:
        """Cut ``data`` into frames: see the module's docstring."""
        conn = self.conn
        pos, end = 0, len(data)
        need = 0
        given = 0  # messages handed to the sink from this read
        while pos < end:
            if not self.own_framing or conn.state is not State.OPEN:
                super().data_received(data[pos:])
                return
            if end - pos < 2:
                break
            first, second = data[pos], data[pos + 1]
            length = second & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                head = 10
            limit = conn.max_message_size
            if limit is not None and length > limit:
                self.own_framing = False  # websockets refuses it (1009) as it arrives
                continue
            masked = second & 0x80
            total = head + (4 if masked else 0) + length
            if end - pos < total:
                need = total
                break
            sink = self.sink
            if (first == 0x82 and masked and sink is not None and not self.close_sent
                    and conn.current_size is None):
                payload = apply_mask(data[pos + head + 4:pos + total], data[pos + head:pos + head + 4])
                pos += total
                if given == 1 and self.batch is not None:  # a second message in this read
                    opened = self.batch()
                    opened.__enter__()
                    self._opened = opened
                given += 1
                sink(payload)
            else:
                # One whole frame of any other kind: websockets parses it, checks included.
                super().data_received(data[pos:pos + total])
                pos += total
        if pos < end:
            self.partial = bytearray(data[pos:])
            self.need = need

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
        """A frame written now goes out (``Connection`` reads the three attributes inline)."""
        return not self.write_paused and not self.close_sent and not self.disconnected

    def write_wire(self, frames: list[bytes]) -> None:
        """Write whole websocket frames (``wire_frame``) in one go."""
        self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def write_frame(self, frame: bytes) -> None:
        """Write one whole websocket frame (``wire_frame``)."""
        self.transport.write(frame)

    def pause_writing(self) -> None:
        self.write_paused = True
        super().pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
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
