"""Websocket framing on the room socket, spoken byte by byte over a raw TCP connection.

The room socket cuts client frames itself (collab/wsfast.py) and hands everything that is not a
plain final binary frame to the websockets library. What clients and operators rely on: a frame
that arrives in pieces is one message, pings are answered and fragmented messages reassembled
wherever they fall among updates, and every violation of RFC 6455 still gets its websocket close
code — with the server up, the room and its stored text intact."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from urllib.parse import urlsplit

import pycrdt
import pytest

from clients import YClient
from collab import protocol


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0,
                 claimed_length: int | None = None) -> bytes:
    """A client→server frame as RFC 6455 lays it out (masked unless told otherwise)."""
    length = len(payload) if claimed_length is None else claimed_length
    out = bytearray([(0x80 if fin else 0) | rsv | opcode])
    flag = 0x80 if mask else 0
    if length < 126:
        out.append(flag | length)
    elif length < 1 << 16:
        out.append(flag | 126)
        out += struct.pack("!H", length)
    else:
        out.append(flag | 127)
        out += struct.pack("!Q", length)
    if mask:
        key = os.urandom(4)
        out += key
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes(out + payload)


class RawSocket:
    """A websocket client with nothing between the test and the bytes on the wire."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, base_url: str, room: str) -> RawSocket:
        parts = urlsplit(base_url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(
            f"GET {parts.path.rstrip('/')}/{room} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send(self, data: bytes, *, piece: int | None = None) -> None:
        if piece is None:
            self.writer.write(data)
            await self.writer.drain()
            return
        for start in range(0, len(data), piece):
            self.writer.write(data[start:start + piece])
            await self.writer.drain()
            await asyncio.sleep(0)  # let each piece leave as its own segment

    async def frame(self, timeout: float = 10) -> tuple[int, bytes]:
        """The next server frame: (opcode, payload). Server frames are never masked."""
        async def read() -> tuple[int, bytes]:
            first, second = await self.reader.readexactly(2)
            assert not second & 0x80, "a server frame was masked"
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return first & 0x0F, await self.reader.readexactly(length)
        return await asyncio.wait_for(read(), timeout)

    async def until(self, opcode: int, timeout: float = 10) -> bytes:
        """Skip frames until one with ``opcode``; its payload."""
        async with asyncio.timeout(timeout):
            while True:
                got, payload = await self.frame()
                if got == opcode:
                    return payload

    async def close_code(self, timeout: float = 10) -> int:
        payload = await self.until(0x8, timeout)
        return struct.unpack("!H", payload[:2])[0]

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


def text_updates(*parts: str) -> list[bytes]:
    """One update per part, appended in order to a Text named "text"."""
    doc = pycrdt.Doc()
    text = doc.get("text", type=pycrdt.Text)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(bytes(event.update)))
    for part in parts:
        text.insert(len(text), part)
    return updates


async def test_a_frame_that_arrives_in_pieces_is_one_message(server):
    small, big = text_updates("hello ", "w" * 70_000)
    async with YClient(server.url, "pieces") as reader:
        raw = await RawSocket.open(server.url, "pieces")
        try:
            await raw.send(client_frame(0x2, protocol.encode_update(small)), piece=1)  # byte by byte
            await raw.send(client_frame(0x2, protocol.encode_update(big)), piece=1000)
            await reader.wait_for(lambda: reader.text() == "hello " + "w" * 70_000, timeout=10, what="both updates")
        finally:
            await raw.close()


async def test_pings_and_fragments_among_updates_in_one_write(server):
    one, two, three = (protocol.encode_update(u) for u in text_updates("one ", "two ", "three"))
    wire = (client_frame(0x2, one)
            + client_frame(0x9, b"are you there")          # ping, between two updates
            + client_frame(0x2, two[:3], fin=False)        # a fragmented message...
            + client_frame(0x9, b"mid-message")            # ...with a ping inside it (allowed)
            + client_frame(0x0, two[3:])                   # ...and its final continuation
            + client_frame(0x2, three))
    async with YClient(server.url, "mixed") as reader:
        raw = await RawSocket.open(server.url, "mixed")
        try:
            await raw.send(wire)
            assert await raw.until(0xA) == b"are you there"
            assert await raw.until(0xA) == b"mid-message"
            await reader.wait_for(lambda: reader.text() == "one two three", timeout=10, what="three updates")
            # and the connection is still a working member: it is sent the next change
            reader.doc.get("text", type=pycrdt.Text).insert(0, ">")
            while True:
                opcode, payload = await raw.frame()
                if opcode == 0x2 and isinstance(protocol.decode(payload, LIMITS), protocol.SyncUpdate):
                    break
        finally:
            await raw.close()


LIMITS = protocol.Limits(max_frame_bytes=1 << 20, max_depth=64, max_awareness_entries=100,
                         max_awareness_state_bytes=100_000)

VIOLATIONS = {
    # RFC 6455 5.1: a client must mask every frame
    "unmasked frame": (lambda update: client_frame(0x2, update, mask=False), 1002),
    # 5.2: no extension was negotiated, so no RSV bit may be set
    "reserved bit set": (lambda update: client_frame(0x2, update, rsv=0x40), 1002),
    # 5.4: a continuation frame needs a message to continue
    "continuation out of nowhere": (lambda update: client_frame(0x0, update), 1002),
    # 5.5: control frames are never fragmented and carry at most 125 bytes
    "fragmented ping": (lambda update: client_frame(0x9, b"x", fin=False), 1002),
    "opcode 3 is reserved": (lambda update: client_frame(0x3, update), 1002),
    # 5.4: a new message may not start while a fragmented one is unfinished
    "message inside a fragmented one": (
        lambda update: client_frame(0x2, update[:2], fin=False) + client_frame(0x2, update), 1002),
    # a header announcing more than the server accepts: refused before the payload arrives
    "frame over the size limit": (lambda update: client_frame(0x2, b"", claimed_length=50 << 20), 1009),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
async def test_framing_violations_get_their_close_code_and_nothing_else_suffers(server, case):
    build, code = VIOLATIONS[case]
    (kept,) = text_updates("kept")
    async with YClient(server.url, "strict") as good:
        raw = await RawSocket.open(server.url, "strict")
        try:
            await raw.send(client_frame(0x2, protocol.encode_update(kept)))  # a good update first
            await good.wait_for(lambda: good.text() == "kept", timeout=10, what="the good update")
            await raw.send(build(protocol.encode_update(kept)))
            assert await raw.close_code() == code
        finally:
            await raw.close()
        good.doc.get("text", type=pycrdt.Text).insert(4, "!")
        async with YClient(server.url, "strict") as fresh:
            await fresh.wait_for(lambda: fresh.text() == "kept!", timeout=10, what="room intact")
    assert (await server.get("/healthz")).status_code == 200
