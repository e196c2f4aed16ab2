"""Stock Yjs clients (Node `yjs` + `y-websocket` 3.1) against a real `collab serve` process."""

from __future__ import annotations

import asyncio

from servers import wait_until
from yjs import NodeYjs


async def test_two_clients_converge_on_concurrent_edits(server, node):
    a = await node.client(server.url, "notes/a")
    b = await node.client(server.url, "notes/a")
    await asyncio.gather(a.insert(0, "hello "), b.insert(0, "world "))
    await asyncio.gather(a.append("from a"), b.append("from b"))
    await wait_until(lambda: _same(a, b), what="convergence")
    text = await a.text()
    for piece in ("hello ", "world ", "from a", "from b"):
        assert piece in text
    assert len(text) == len("hello world from afrom b")


async def _same(a, b) -> bool:
    return await a.text() == await b.text() and len(await a.text()) > 0


async def test_late_joiner_gets_the_state(server, node):
    a = await node.client(server.url, "room with space/and/slashes")
    await a.insert(0, "first words")
    late = await node.client(server.url, "room with space/and/slashes")
    await late.wait_text("first words")


async def test_rooms_are_isolated(server, node):
    a = await node.client(server.url, "iso-1")
    b = await node.client(server.url, "iso-2")
    await a.insert(0, "only in one")
    c = await node.client(server.url, "iso-1")
    await c.wait_text("only in one")
    assert await b.text() == ""


async def test_awareness_appears_and_vanishes_on_abrupt_disconnect(server, node):
    watcher = await node.client(server.url, "presence-room")
    async with NodeYjs() as other_process:
        other = await other_process.client(server.url, "presence-room", params={"name": "Ann"},
                                           awareness={"user": {"name": "Ann"}})
        other_id = other.id
        states = await watcher.wait_for(
            lambda: _has_state(watcher, other_id), timeout=5, what="remote awareness")
        assert states[other_id]["user"]["name"] == "Ann"
        await other_process.kill()  # no close frame, no awareness null from the client
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        await watcher.wait_for(lambda: _gone(watcher, other_id), timeout=3, what="awareness removal")
        assert loop.time() - killed_at < 2.0


async def _has_state(client, cid):
    states = await client.awareness()
    return states if cid in states else None


async def _gone(client, cid):
    return cid not in await client.awareness()


async def test_offline_edits_merge_on_reconnect(server, node):
    a = await node.client(server.url, "offline")
    b = await node.client(server.url, "offline")
    await a.insert(0, "shared ")
    await b.wait_text("shared ")
    await a.disconnect()
    await a.append("offline-a ")
    await b.append("online-b ")
    await a.connect()
    await a.wait_synced()
    await wait_until(lambda: _same(a, b), what="merge after reconnect")
    text = await a.text()
    assert "offline-a " in text and "online-b " in text and text.startswith("shared ")


async def test_server_keeps_lone_client_alive_past_its_watchdog(server_factory, node):
    # The y-websocket client reconnects when nothing arrives for 30 s; a lone client receives no
    # relays, so the server must send keepalive traffic. Shorten the interval to prove it quickly.
    srv = await server_factory(keepalive_seconds=0.3)
    client = await node.client(srv.url, "lonely")
    before = len(client.events("connection-close"))
    frames = await srv.metric("collab_bytes_out_total")
    await wait_until(lambda: _bytes_grew(srv, frames + 3 * 3), timeout=5, what="keepalive frames")
    assert len(client.events("connection-close")) == before
    assert (await client.status())["connected"]


async def _bytes_grew(srv, threshold):
    return await srv.metric("collab_bytes_out_total") >= threshold


async def test_pycrdt_websocket_provider_syncs_with_yjs_client(server, node):
    """pycrdt's own Python client stack (pycrdt Provider over pycrdt-websocket's channel) and Yjs."""
    from httpx_ws import aconnect_ws
    from pycrdt import Doc, Provider, Text
    from pycrdt.websocket.websocket import HttpxWebsocket

    js = await node.client(server.url, "py-and-js")
    await js.insert(0, "from js. ")
    doc = Doc()
    text = doc.get("text", type=Text)
    async with aconnect_ws(f"{server.http}/py-and-js") as ws, \
            Provider(doc, HttpxWebsocket(ws, "py-and-js")):
        await wait_until(lambda: "from js." in str(text), timeout=10, what="python provider sync")
        text += "from python."
        await js.wait_text("from js. from python.")
