"""The room socket's hot path (collab/wsfast.py): frames handled inside the protocol, written
straight from the loop. What a client relies on: every size of frame arrives intact, updates
arrive in the order they were sent even when a connection is past its in-flight bound (the
messages then queue behind the reader task), service messages keep their place among updates,
and the plain uvicorn protocols (``--ws-impl websockets``) still work the slower way."""

from __future__ import annotations

import asyncio

import pycrdt
import pytest

from clients import YClient
from collab import protocol
from collab.connection import InflightLimit
from collab.wsfast import frame_header, wire_frame, wire_payload
from servers import wait_until

LIMITS = protocol.Limits(max_frame_bytes=1 << 20, max_depth=64, max_awareness_entries=100,
                         max_awareness_state_bytes=100_000)


def test_frame_header_lengths():
    assert frame_header(0) == b"\x82\x00"
    assert frame_header(125) == b"\x82\x7d"
    assert frame_header(126) == b"\x82\x7e\x00\x7e"
    assert frame_header(65535) == b"\x82\x7e\xff\xff"
    assert frame_header(65536) == b"\x82\x7f" + (65536).to_bytes(8, "big")


@pytest.mark.parametrize("size", [0, 125, 126, 65_535, 65_536, 300_000])
def test_a_queued_message_survives_being_framed_and_unframed(size):
    # A connection's outbox switches between whole websocket frames and bare messages when the
    # fast socket is attached or detached with something queued.
    message = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert wire_payload(wire_frame(message)) == message


def _text_update(chars: str) -> bytes:
    doc = pycrdt.Doc()
    doc.get("text", type=pycrdt.Text).insert(0, chars)
    return doc.get_update()


def test_decode_takes_short_updates_fast_and_everything_else_as_before():
    short = _text_update("hi")
    assert protocol.decode(b"\x00\x02" + bytes((len(short),)) + short, LIMITS) == protocol.SyncUpdate(short)
    assert protocol.encode_update(short) == b"\x00\x02" + bytes((len(short),)) + short
    # An update of 128 bytes or more has a length of two bytes or more: read whole...
    long = _text_update("x" * 150)
    assert 128 <= len(long) < 256
    assert protocol.decode(protocol.encode_update(long), LIMITS) == protocol.SyncUpdate(long)
    # ...and a frame claiming it in one byte (which then has its continuation bit set) is not
    # taken for a short update, although that byte equals the bytes that follow it.
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(b"\x00\x02" + bytes((len(long),)) + long, LIMITS)
    # The same short form of the other sync messages, and a sync type nobody knows.
    state = pycrdt.Doc().get_state()
    assert protocol.decode(protocol.encode_sync_step1(state), LIMITS) == protocol.SyncStep1(state)
    assert protocol.decode(protocol.encode_sync_step2(short), LIMITS) == protocol.SyncStep2(short)
    with pytest.raises(protocol.ProtocolError, match="unknown sync message"):
        protocol.decode(b"\x00\x03" + bytes((len(short),)) + short, LIMITS)
    # Declared lengths that don't fill the frame exactly, and a bad update, are refused.
    with pytest.raises(protocol.ProtocolError, match="trailing bytes"):
        protocol.decode(b"\x00\x02" + bytes((len(short) - 1,)) + short, LIMITS)
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.decode(b"\x00\x02" + bytes((len(short) + 1,)) + short, LIMITS)
    with pytest.raises(protocol.ProtocolError, match="invalid update"):
        protocol.decode(b"\x00\x02\x03\x01\x01\x01", LIMITS)


@pytest.mark.parametrize("size", [10, 200, 70_000, 300_000])
async def test_every_frame_length_is_relayed_intact(server, size):
    async with YClient(server.url, "sizes") as writer, YClient(server.url, "sizes") as reader:
        writer.doc.get("text", type=pycrdt.Text).insert(0, "y" * size)
        await reader.wait_for(lambda: reader.text() == "y" * size, timeout=10, what=f"{size} chars")


@pytest.mark.parametrize("bound", [
    {"max_inflight": 1},  # one update in flight at a time
    {"max_inflight_bytes": 60},  # a few updates' bytes in flight at a time
    {"max_inflight_bytes": 1},  # every update is bigger than the bound: each passes alone
])
async def test_updates_past_the_inflight_bound_keep_their_order(server_factory, bound):
    # A burst sent in one go mostly waits in the reader task, while the fast path keeps
    # handling whatever it can — order must hold regardless, and nothing may wait forever.
    srv = await server_factory(**bound)
    async with YClient(srv.url, "order") as writer, YClient(srv.url, "order") as reader:
        received: list[bytes] = []
        original = reader._handle

        def spy(frame: bytes) -> None:
            message = protocol.decode(frame, LIMITS)
            if isinstance(message, protocol.SyncUpdate):
                received.append(message.update)
            original(frame)

        reader._handle = spy  # type: ignore[method-assign]
        source = pycrdt.Doc()
        text = source.get("text", type=pycrdt.Text)
        updates: list[bytes] = []
        source.observe(lambda event: updates.append(bytes(event.update)))
        for i in range(300):
            text.insert(len(text), f"{i},")
        for update in updates:  # back to back, without waiting for anything
            await writer.send_raw(protocol.encode_update(update))
        expected = str(text)
        await reader.wait_for(lambda: len(received) == len(updates), timeout=15, what="all 300 updates")
        assert received == updates  # relayed in the order sent
        assert reader.text() == expected
    async with YClient(srv.url, "order") as fresh:
        assert fresh.text() == expected


async def test_service_messages_and_updates_interleaved(server):
    # A chat message goes the slow way (the reader task awaits the service); the updates sent
    # right behind it queue behind it, and everything arrives.
    async with YClient(server.url, "mixed") as writer, YClient(server.url, "mixed") as reader:
        chats: list[str] = []
        original = reader._handle

        def spy(frame: bytes) -> None:
            message = protocol.decode(frame, LIMITS)
            if isinstance(message, protocol.ExtensionMessage) and message.type == "chat.message":
                chats.append(message.body["message"]["text"])
            original(frame)

        reader._handle = spy  # type: ignore[method-assign]
        text = writer.doc.get("text", type=pycrdt.Text)
        for i in range(8):  # within the default chat burst
            await writer.send_raw(protocol.encode_extension({"type": "chat.send", "text": f"m{i}"}))
            text.insert(len(text), f"{i};")
        expected = "".join(f"{i};" for i in range(8))
        await reader.wait_for(lambda: reader.text() == expected and len(chats) == 8, timeout=10,
                              what="8 updates and 8 chat messages")
        assert chats == [f"m{i}" for i in range(8)]


async def test_plain_uvicorn_protocol_still_serves_rooms(server_factory):
    srv = await server_factory(ws_impl="websockets")
    async with YClient(srv.url, "plain") as a, YClient(srv.url, "plain") as b:
        a.doc.get("text", type=pycrdt.Text).insert(0, "over the writer task")
        await b.wait_for(lambda: b.text() == "over the writer task", timeout=10, what="relay")


def test_the_inflight_bound_counts_updates_and_bytes():
    limit = InflightLimit(4, 100)
    assert limit.try_acquire(60) and limit.try_acquire(30)
    assert not limit.try_acquire(20)  # 110 bytes would be over
    assert limit.try_acquire(10) and limit.try_acquire(0)
    assert not limit.try_acquire(0)  # 4 updates: the count bound
    for size in (60, 30, 10, 0):
        limit.release(size)
    assert (limit.count, limit.bytes) == (0, 0)
    assert limit.try_acquire(500)  # alone, an update over the byte bound still passes
    assert not limit.try_acquire(1)
    limit.release(500)


async def test_a_waiting_update_goes_first_and_resumes_at_half_the_bounds():
    limit = InflightLimit(100, 100)
    assert limit.try_acquire(80)
    waiter = asyncio.create_task(limit.acquire(30))
    await wait_until(lambda: limit._waiting, what="the waiter at its wait")
    assert not waiter.done()
    assert not limit.try_acquire(1)  # the waiting update was received first
    limit.release(80)
    await asyncio.wait_for(waiter, 5)
    assert (limit.count, limit.bytes) == (1, 30)
    assert limit.try_acquire(1)  # the fast path is open again
