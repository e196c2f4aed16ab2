"""Proves the stock-Yjs-client harness (tests/yjs.py + tests/node/driver.mjs) against the
reference Node server, so that failures elsewhere can be blamed on the server under test."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.server import ServerConnection, serve

from yjs import NodeError, NodeYjs, ReferenceServer


@pytest.fixture
async def ref() -> AsyncIterator[ReferenceServer]:
    async with ReferenceServer() as server:
        yield server


@pytest.fixture
async def node() -> AsyncIterator[NodeYjs]:
    async with NodeYjs() as n:
        yield n


@pytest.fixture
def room() -> str:
    return f"room-{uuid.uuid4().hex[:12]}"


async def test_concurrent_inserts_converge(ref: ReferenceServer, node: NodeYjs, room: str) -> None:
    a = await node.client(ref.url, room)
    b = await node.client(ref.url, room)
    await asyncio.gather(a.insert(0, "alpha"), b.insert(0, "beta"))
    await asyncio.gather(*(c.append(f"-{c.name}") for c in (a, b)))
    await a.wait_for(lambda: _same_text(a, b), timeout=5, what="convergence")
    text = await a.text()
    assert "alpha" in text and "beta" in text
    assert len(text) == len("alpha") + len("beta") + len(f"-{a.name}") + len(f"-{b.name}")
    assert f"-{a.name}" in text and f"-{b.name}" in text


async def _same_text(*clients) -> bool:
    texts = await asyncio.gather(*(c.text() for c in clients))
    return len(set(texts)) == 1 and texts[0] != ""


async def test_late_joiner_gets_state(ref: ReferenceServer, node: NodeYjs, room: str) -> None:
    a = await node.client(ref.url, room)
    witness = await node.client(ref.url, room)
    await a.insert(0, "hello world")
    await a.map_set("k", {"n": 1, "s": "x"})
    # the witness seeing it proves the server has applied it
    await witness.wait_text("hello world", timeout=5)
    await witness.wait_for(lambda: witness.map_get("k"), timeout=5)

    late = await node.client(ref.url, room)  # returns once synced (Step2 received)
    assert await late.text() == "hello world"
    assert await late.map_get("k") == {"n": 1, "s": "x"}
    assert await late.map_get() == {"k": {"n": 1, "s": "x"}}
    assert await late.state_vector() == await a.state_vector()


async def test_awareness_disappears_after_sigkill(ref: ReferenceServer, node: NodeYjs, room: str) -> None:
    async with NodeYjs() as doomed:
        a = await doomed.client(ref.url, room, awareness={"user": "alice"})
        b = await node.client(ref.url, room, awareness={"user": "bob"})

        async def a_seen_by_b() -> bool:
            return (await b.awareness()).get(a.id) == {"user": "alice"}

        await b.wait_for(a_seen_by_b, timeout=5, what="A's awareness at B")
        assert (await a.awareness()).get(b.id) == {"user": "bob"}

        start = time.monotonic()
        await doomed.kill()
        with pytest.raises(NodeError):
            await a.text()

        async def a_gone() -> bool:
            return a.id not in await b.awareness()

        await b.wait_for(a_gone, timeout=5, what="A's awareness removed at B")
        assert time.monotonic() - start < 5
        assert (await b.awareness()) == {b.id: {"user": "bob"}}


async def test_awareness_update_and_removal(ref: ReferenceServer, node: NodeYjs, room: str) -> None:
    a = await node.client(ref.url, room, awareness={"cursor": 1})
    b = await node.client(ref.url, room, awareness=False)  # announces nothing
    await b.wait_for(lambda: _state_of(b, a.id, {"cursor": 1}), timeout=5)
    await a.set_awareness({"cursor": 2})
    await b.wait_for(lambda: _state_of(b, a.id, {"cursor": 2}), timeout=5)
    await a.set_awareness(None)
    await b.wait_for(lambda: _absent(b, a.id), timeout=5)
    assert b.id not in await a.awareness()


async def _state_of(c, client_id: int, state: dict) -> bool:
    return (await c.awareness()).get(client_id) == state


async def _absent(c, client_id: int) -> bool:
    return client_id not in await c.awareness()


async def test_offline_edits_merge(ref: ReferenceServer, node: NodeYjs, room: str) -> None:
    a = await node.client(ref.url, room)
    b = await node.client(ref.url, room)
    await a.insert(0, "base")
    await b.wait_text("base", timeout=5)

    since = len(node.events)
    await a.disconnect()
    await a.wait_event("status", lambda e: e["status"] == "disconnected", timeout=5, since=since)
    await a.append(" A-offline")
    await b.insert(0, "B-online ")
    await b.wait_text("B-online base")  # local edit
    assert await a.text() == "base A-offline"  # A really is offline

    await a.connect()
    await a.wait_synced(timeout=5)
    await a.wait_text("B-online base A-offline", timeout=5)
    await b.wait_text("B-online base A-offline", timeout=5)
    status = await a.status()
    assert status["connected"] and status["synced"]


async def test_close_events_and_reconnect_after_server_restart(node: NodeYjs, room: str) -> None:
    ref = ReferenceServer()
    await ref.start()
    try:
        a = await node.client(ref.url, room)
        await a.insert(0, "survives")

        since = len(node.events)
        await ref.stop(kill=True)  # no close frame: the client sees 1006
        close = await a.wait_event("connection-close", timeout=5, since=since)
        assert (close["code"], close["local"]) == (1006, False)
        assert not (await a.status())["connected"]

        await ref.start()  # same port, empty document
        await a.wait_synced(timeout=10)  # reconnect backoff is at most 2.5 s
        fresh = await node.client(ref.url, room)
        await fresh.wait_text("survives", timeout=5)  # A pushed its state to the new server

        since = len(node.events)
        await a.disconnect()
        local = await a.wait_event("connection-close", timeout=5, since=since)
        assert (local["code"], local["local"]) == (None, True)
        codes = [c["code"] for c in await a.closes()]
        # One 1006 for the kill, maybe more for reconnect attempts while the server was down.
        assert codes[-1] is None and codes[:-1] and set(codes[:-1]) == {1006}
    finally:
        await ref.stop()


class ClosingServer:
    """A websocket server closing every connection with one code; records request paths."""

    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason
        self.paths: list[str] = []

    async def handler(self, ws: ServerConnection) -> None:
        self.paths.append(ws.request.path)
        await ws.close(self.code, self.reason)


async def test_terminal_close_code_stops_reconnecting(node: NodeYjs) -> None:
    srv = ClosingServer(4403, "forbidden")
    async with serve(srv.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        c = await node.client(
            f"ws://127.0.0.1:{port}", "doc/a", params={"token": "s3cret value"}, wait_synced=False
        )
        with pytest.raises(NodeError, match="4403"):
            await c.wait_synced(timeout=5)
        closed = await c.wait_event("closed", timeout=5)
        assert (closed["code"], closed["reason"]) == (4403, "forbidden")
        assert await c.closes() == [{"code": 4403, "reason": "forbidden", "local": False}]
        assert (await c.status())["should_connect"] is False
        # room is appended verbatim, params are url-encoded
        assert srv.paths == ["/doc/a?token=s3cret%20value"]


async def test_other_close_codes_reconnect(node: NodeYjs) -> None:
    srv = ClosingServer(1011, "try later")
    async with serve(srv.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        c = await node.client(f"ws://127.0.0.1:{port}", "r", wait_synced=False)
        await c.wait_for(lambda: len(srv.paths) >= 3, timeout=5, what="3 connection attempts")
        codes = {(x["code"], x["reason"]) for x in await c.closes()}
        assert codes == {(1011, "try later")}
        assert not c.events("closed")
        await c.destroy()


async def test_update_roundtrip_and_burst(ref: ReferenceServer, node: NodeYjs, room: str) -> None:
    a = await node.client(ref.url, room)
    b = await node.client(ref.url, room)
    typed = await a.type_burst(60, interval_ms=5)
    assert typed == ("abcdefghijklmnopqrstuvwxyz" * 3)[:60]
    await b.wait_text(typed, timeout=5)
    await b.delete(0, 10)
    await a.wait_text(typed[10:], timeout=5)

    offline = await node.client(ref.url, room, connect=False)
    assert await offline.text() == ""
    await offline.apply_update(await a.update())
    assert await offline.text() == typed[10:]
    assert await offline.state_vector() == await a.state_vector()
    assert not (await offline.status())["connected"]


async def test_driver_survives_bad_requests(node: NodeYjs) -> None:
    with pytest.raises(NodeError, match="unknown command"):
        await node.request("no_such_command")
    with pytest.raises(NodeError, match="unknown client"):
        await node.request("text", client="nobody")
    with pytest.raises(NodeError, match="missing argument"):
        await node.request("open", client="x")
    assert node._proc is not None and node._proc.stdin is not None
    node._proc.stdin.write(b"this is not json\n[1,2]\n")
    assert await node.request("ping") == "pong"
    assert node.alive
