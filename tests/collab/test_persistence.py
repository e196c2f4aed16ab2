"""Durable before relayed: edits survive restarts and SIGKILL; compaction and unload lose nothing."""

from __future__ import annotations

import asyncio
import signal

import pycrdt

from clients import YClient
from servers import wait_until
from storage import open_store


async def test_edits_survive_a_graceful_restart(server_factory, tmp_path, node):
    srv = await server_factory(data_dir=tmp_path / "a")
    a = await node.client(srv.url, "doc")
    await a.insert(0, "persist me")
    b = await node.client(srv.url, "doc")
    await b.wait_text("persist me")
    assert await srv.stop(signal.SIGTERM) == 0
    srv2 = await server_factory(data_dir=tmp_path / "a", port=srv.port)
    async with YClient(srv2.url, "doc") as fresh:
        assert fresh.text() == "persist me"


async def test_a_graceful_stop_folds_each_rooms_log_into_its_snapshot(server_factory, tmp_path, node):
    """The next start's first join reads one snapshot, not a replay of the log."""
    srv = await server_factory(data_dir=tmp_path / "f", compact_after_updates=100_000)
    writers = [await node.client(srv.url, room) for room in ("one", "two")]
    await asyncio.gather(*(w.type_burst(60, interval_ms=1) for w in writers))
    expected = {room: await w.text() for room, w in zip(("one", "two"), writers)}
    for room, text in expected.items():  # stored: a fresh client gets only what is durable
        async with YClient(srv.url, room) as fresh:
            await wait_until(lambda: fresh.text() == text, timeout=10, what="the typing stored")
    assert await srv.metric("collab_compactions_total") == 0
    assert await srv.stop(signal.SIGTERM) == 0
    store = open_store(str(tmp_path / "f" / "collab.db"))
    await store.open()
    try:
        for room, text in expected.items():
            state = await store.load(room)
            assert state.updates == [] and state.snapshot
            doc = pycrdt.Doc()
            doc.apply_update(state.snapshot)
            assert len(text) == 60 and str(doc.get("text", type=pycrdt.Text)) == text
            assert len(await store.history(room)) == 60  # the history is kept
    finally:
        await store.close()


async def test_sigkill_loses_nothing_another_client_received(server_factory, tmp_path, node):
    """Type continuously, SIGKILL the server mid-stream, then check that every character the
    observing client had received is in storage."""
    srv = await server_factory(data_dir=tmp_path / "k")
    writer = await node.client(srv.url, "k")
    observer = await node.client(srv.url, "k")
    burst = asyncio.create_task(writer.type_burst(400, interval_ms=2))
    await observer.wait_for(lambda: _len_at_least(observer, 120), timeout=15, what="typing to reach observer")
    await srv.kill()
    seen = await observer.text()
    await asyncio.gather(burst, return_exceptions=True)
    assert len(seen) >= 120
    srv2 = await server_factory(data_dir=tmp_path / "k", port=srv.port)
    async with YClient(srv2.url, "k") as fresh:
        stored = fresh.text()
    # The observer only ever saw updates that were already committed: all of them are stored.
    assert stored.startswith(seen), (len(seen), len(stored))


async def _len_at_least(client, n):
    return len(await client.text()) >= n


async def test_compaction_and_unload_keep_every_update(server_factory, tmp_path, node):
    srv = await server_factory(data_dir=tmp_path / "c", compact_after_updates=20, room_grace_seconds=0.2)
    writers = [await node.client(srv.url, "busy") for _ in range(3)]
    await asyncio.gather(*(w.type_burst(150, interval_ms=1) for w in writers))
    await wait_until(lambda: _all_same(writers, 450), timeout=15, what="convergence")
    expected = await writers[0].text()
    assert await srv.metric("collab_compactions_total") >= 1
    for w in writers:
        await w.destroy()
    await wait_until(lambda: _rooms_loaded(srv, 0), timeout=10, what="room unload")
    async with YClient(srv.url, "busy") as fresh:  # reloads from snapshot + tail
        assert fresh.text() == expected
    await srv.stop()
    store = open_store(str(tmp_path / "c" / "collab.db"))
    await store.open()
    try:
        state = await store.load("busy")
        doc = pycrdt.Doc()
        if state.snapshot:
            doc.apply_update(state.snapshot)
        for u in state.updates:
            doc.apply_update(u)
        assert str(doc.get("text", type=pycrdt.Text)) == expected
        assert len(state.updates) < 20  # folded into the snapshot on unload
    finally:
        await store.close()


async def _all_same(clients, n):
    texts = [await c.text() for c in clients]
    return len(set(texts)) == 1 and len(texts[0]) == n


async def _rooms_loaded(srv, n):
    return await srv.metric("collab_rooms_loaded") == n


async def test_sigterm_closes_sockets_with_1012_and_exits_zero(server_factory, tmp_path, node):
    srv = await server_factory(data_dir=tmp_path / "t")
    client = await node.client(srv.url, "bye")
    await client.insert(0, "x")
    since = len(node.events)
    assert await srv.stop(signal.SIGTERM) == 0
    event = await node.wait_event("connection-close", client=client.name, since=since, timeout=5)
    assert event["code"] == 1012
