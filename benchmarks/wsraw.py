"""A minimal, fast websocket client for load generation (RFC 6455, client side, no extensions).

Why not ``websockets.asyncio``: one coroutine hop and a frame parser generator per message cost
tens of microseconds, and a load generator on a 2-core machine receiving 100k frames/s cannot
afford that. Here a connection is a plain ``asyncio.Protocol``:

* frames to the server are masked once, ahead of time (``client_frame``), so a send is a single
  ``transport.write`` of prebuilt bytes;
* frames from the server (never masked) are cut out of the receive buffer in a tight loop and
  handed to ``on_message(conn, payload)`` synchronously, inside ``data_received``;
* pings are answered, close frames are answered and recorded (``close_code``), fragmented
  messages are reassembled. Text frames are counted and dropped (not part of y-websocket).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
import time
from collections.abc import Callable
from urllib.parse import quote, urlsplit

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
ABNORMAL = 1006  # closed without a close frame


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return payload
    reps = key * (n // 4 + 1)
    return (int.from_bytes(payload, "little") ^ int.from_bytes(reps[:n], "little")).to_bytes(n, "little")


def client_frame(payload: bytes, opcode: int = OP_BINARY) -> bytes:
    """One complete, masked client frame carrying ``payload``."""
    n = len(payload)
    head = bytes((0x80 | opcode,))
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 65536:
        head += bytes((0x80 | 126,)) + struct.pack("!H", n)
    else:
        head += bytes((0x80 | 127,)) + struct.pack("!Q", n)
    key = os.urandom(4)
    return head + key + _mask(payload, key)


def close_frame(code: int = 1000, reason: str = "") -> bytes:
    return client_frame(struct.pack("!H", code) + reason.encode("utf-8")[:120], OP_CLOSE)


def split_url(url: str, room: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise ValueError(f"only ws:// URLs are supported, got {url!r}")
    base = parts.path.rstrip("/")
    path = base + "/" + quote(room, safe="/")
    if parts.query:
        path += "?" + parts.query
    return parts.hostname or "127.0.0.1", parts.port or 80, path


class RawConnection(asyncio.Protocol):
    """One websocket client connection. Create with :func:`connect`."""

    __slots__ = ("host", "path", "on_message", "on_close", "transport", "opened", "closed",
                 "close_code", "close_reason", "frames_in", "bytes_in", "text_frames", "_buf",
                 "_handshake", "_key", "_fragments", "_closing", "tag", "connect_started",
                 "connected_at", "_writable")

    def __init__(self, host: str, path: str, on_message: Callable[[RawConnection, bytes], None] | None = None,
                 on_close: Callable[[RawConnection], None] | None = None, tag: object = None) -> None:
        self.host = host
        self.path = path
        self.on_message = on_message
        self.on_close = on_close
        self.tag = tag
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.close_code: int | None = None
        self.close_reason = ""
        self.frames_in = 0
        self.bytes_in = 0
        self.text_frames = 0
        self._buf = bytearray()
        self._handshake = True
        self._key = base64.b64encode(os.urandom(16))
        self._fragments: list[bytes] | None = None
        self._closing = False
        self.connect_started = time.perf_counter()
        self.connected_at = 0.0
        self._writable: asyncio.Event | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\nUser-Agent: collab-bench\r\n\r\n"
        )
        transport.write(request.encode("ascii"))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        self.bytes_in += len(data)
        if self._handshake:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self._fail("handshake response too large")
                return
            head = bytes(buf[:end]).decode("latin-1")
            del buf[:end + 4]
            status = head.split("\r\n", 1)[0]
            if " 101 " not in status + " ":
                self._fail(f"handshake refused: {status}")
                return
            expected = base64.b64encode(hashlib.sha1(self._key + _GUID).digest()).decode()
            if expected not in head:
                self._fail("bad Sec-WebSocket-Accept")
                return
            self._handshake = False
            self.connected_at = time.perf_counter()
            if not self.opened.done():
                self.opened.set_result(None)
        self._parse()

    def _parse(self) -> None:
        buf = self._buf
        size = len(buf)
        pos = 0
        on_message = self.on_message
        while size - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            start = pos + 2
            if length == 126:
                if size - start < 2:
                    break
                length = (buf[start] << 8) | buf[start + 1]
                start += 2
            elif length == 127:
                if size - start < 8:
                    break
                length = int.from_bytes(buf[start:start + 8], "big")
                start += 8
            if b1 & 0x80:  # servers must not mask; tolerate it anyway
                if size - start < 4:
                    break
                key = bytes(buf[start:start + 4])
                start += 4
            else:
                key = None
            end = start + length
            if end > size:
                break
            payload = bytes(buf[start:end])
            if key is not None:
                payload = _mask(payload, key)
            pos = end
            opcode = b0 & 0x0F
            if opcode == OP_BINARY and b0 & 0x80:
                self.frames_in += 1
                if on_message is not None:
                    on_message(self, payload)
            else:
                self._control(opcode, bool(b0 & 0x80), payload)
                if opcode == OP_CLOSE or self.transport is None:
                    break
        if pos:
            if pos == size:
                buf.clear()
            else:
                del buf[:pos]

    def _control(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode == OP_BINARY:  # first fragment of a fragmented message
            self._fragments = [payload]
        elif opcode == OP_CONT:
            if self._fragments is None:
                self._fail("unexpected continuation frame")
                return
            self._fragments.append(payload)
            if fin:
                message = b"".join(self._fragments)
                self._fragments = None
                self.frames_in += 1
                if self.on_message is not None:
                    self.on_message(self, message)
        elif opcode == OP_TEXT:
            self.text_frames += 1
        elif opcode == OP_PING:
            self.write(client_frame(payload, OP_PONG))
        elif opcode == OP_CLOSE:
            if self.close_code is None:
                if len(payload) >= 2:
                    self.close_code = struct.unpack("!H", payload[:2])[0]
                    self.close_reason = payload[2:].decode("utf-8", "replace")
                else:
                    self.close_code = 1005
            if not self._closing:
                self._closing = True
                self.write(close_frame(self.close_code if self.close_code not in (1005, 1006) else 1000))
            if self.transport is not None:
                self.transport.close()

    def _fail(self, reason: str) -> None:
        if self.close_code is None:
            self.close_code = ABNORMAL
            self.close_reason = reason
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.abort()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.Event()
        self._writable.clear()

    def resume_writing(self) -> None:
        if self._writable is not None:
            self._writable.set()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark (or gone)."""
        if self._writable is not None and not self._writable.is_set() and self.transport is not None:
            await self._writable.wait()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._writable is not None:
            self._writable.set()
        if self.close_code is None:
            self.close_code = ABNORMAL
            self.close_reason = str(exc) if exc else "connection lost without a close frame"
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(self.close_reason))
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        if self.on_close is not None:
            self.on_close(self)

    # -- sending -------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self._handshake and not self._closing

    def write(self, frame: bytes) -> bool:
        """Write a prebuilt client frame; False if the connection is gone."""
        transport = self.transport
        if transport is None:
            return False
        transport.write(frame)
        return True

    def send(self, payload: bytes) -> bool:
        return self.write(client_frame(payload))

    def write_buffer_size(self) -> int:
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    async def close(self, code: int = 1000, timeout: float = 2.0) -> None:
        if self.transport is None:
            return
        if not self._closing:
            self._closing = True
            self.write(close_frame(code))
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self._closing = True
            self.transport.abort()


async def connect(url: str, room: str, *, on_message: Callable[[RawConnection, bytes], None] | None = None,
                  on_close: Callable[[RawConnection], None] | None = None, tag: object = None,
                  local_host: str | None = None, timeout: float = 10.0) -> RawConnection:
    """Open a websocket to ``url/room``; raises ConnectionError/OSError/TimeoutError on failure."""
    host, port, path = split_url(url, room)
    loop = asyncio.get_running_loop()
    hostport = f"{host}:{port}"

    def factory() -> RawConnection:
        return RawConnection(hostport, path, on_message, on_close, tag)

    local_addr = (local_host, 0) if local_host else None
    async with asyncio.timeout(timeout):
        _transport, conn = await loop.create_connection(factory, host, port, local_addr=local_addr)
        try:
            await conn.opened
        except BaseException:
            conn.abort()
            raise
    return conn


def local_host_for(index: int, spread: int = 64) -> str | None:
    """A loopback source address per connection (127.0.0.2 ...), so that tens of thousands of
    sockets over several runs do not run out of ephemeral ports on one address pair."""
    if spread <= 1:
        return None
    return f"127.0.{(index // 250) % 4}.{2 + index % 250}" if spread > 250 else f"127.0.0.{2 + index % spread}"
