"""Per-user undo/redo end to end: real server processes, the Python SDK for the user who undoes,
stock Yjs clients (Node) for everyone else, and the store as the last word."""

from __future__ import annotations

import asyncio
import warnings

import pycrdt
import pytest
from servers import SECRET, RedisServer, ServerProcess, wait_until

from clients import CollabClient, RequestFailed
from collab.auth import issue_token
from storage import open_store

warnings.filterwarnings("ignore", message="The HMAC key")


def token(user: str, role: str = "editor") -> str:
    return issue_token(SECRET, user=user, role=role)


async def stored(path: str, room: str) -> tuple[str, list]:
    store = open_store(path)
    await store.open()
    try:
        state = await store.load(room)
        history = await store.history(room)
    finally:
        await store.close()
    doc = pycrdt.Doc()
    if state.snapshot:
        doc.apply_update(state.snapshot)
    for update in state.updates:
        doc.apply_update(update)
    return str(doc.get("text", type=pycrdt.Text)), history


async def stored_text_is(path: str, room: str, expected: str) -> bool:
    return (await stored(path, room))[0] == expected


async def compacted(path: str, room: str) -> bool:
    store = open_store(path)
    await store.open()
    try:
        return (await store.load(room)).snapshot is not None
    finally:
        await store.close()


def text(room) -> str:
    return str(room.text())


async def test_undo_reverts_only_the_users_edits_everywhere_and_redo_restores_them(server_factory, node, tmp_path):
    server = await server_factory(secret=SECRET)
    db = str(tmp_path / "collab.db")
    async with CollabClient(server.url, token("alice")) as alice:
        a = await alice.join("notes/a")
        b = await node.client(server.url, "notes/a", params={"token": token("bob")})
        a.text().insert(0, "A1 ")
        await b.wait_text("A1 ")
        await b.append("B1 ")
        await wait_until(lambda: text(a) == "A1 B1 ", what="alice sees bob")
        a.text().insert(6, "A2 ")
        await b.wait_text("A1 B1 A2 ")
        await b.insert(0, "B0 ")
        await wait_until(lambda: text(a) == "B0 A1 B1 A2 ", what="alice sees bob again")

        state = await a.undo()
        assert (state.applied, state.can_undo, state.can_redo) == (True, False, True)
        assert text(a) == "B0 B1 "  # the reply comes after the change reached this client
        await b.wait_text("B0 B1 ")
        await wait_until(lambda: stored_text_is(db, "notes/a", "B0 B1 "), what="undo stored")

        state = await a.redo()
        assert (state.applied, state.can_undo, state.can_redo) == (True, True, False)
        await b.wait_text("B0 A1 B1 A2 ")
        await wait_until(lambda: stored_text_is(db, "notes/a", "B0 A1 B1 A2 "), what="redo stored")
        _, history = await stored(db, "notes/a")
        assert {row.author for row in history} == {"alice", "bob"}
        assert all(row.ts > 0 for row in history)

        state = await a.redo()
        assert not state.applied  # nothing left to redo


async def test_stack_state_is_pushed_and_a_new_edit_clears_redo(server):
    async with CollabClient(server.url, params={"name": "alice"}) as one, \
            CollabClient(server.url, params={"name": "alice"}) as two:
        first = await one.join("pushes")
        second = await two.join("pushes")
        first.text().insert(0, "hello")
        await wait_until(lambda: second.undo_state.can_undo, what="can_undo pushed to the other tab")
        await first.undo()
        await wait_until(lambda: second.undo_state.can_redo and not second.undo_state.can_undo,
                         what="can_redo pushed")
        await wait_until(lambda: text(second) == "", what="undo reached the other tab")
        second.text().insert(0, "new")  # same user, another connection: clears the redo stack
        await wait_until(lambda: first.undo_state.can_undo and not first.undo_state.can_redo,
                         what="redo cleared by a new edit")
        assert not (await first.redo()).applied


async def test_viewers_cannot_undo(server_factory):
    server = await server_factory(secret=SECRET)
    async with CollabClient(server.url, token("vic", role="viewer")) as viewer:
        room = await viewer.join("doc")
        for request in (room.undo, room.redo):
            with pytest.raises(RequestFailed) as refused:
                await request()
            assert refused.value.code == "forbidden"


async def test_undo_works_after_the_server_restarts_and_the_client_reconnects(server_factory, node, tmp_path):
    # Compacting every few updates: after the restart the room loads from a snapshot, and the
    # stacks come from the retained, attributed history.
    server = await server_factory(secret=SECRET, compact_after_updates=3)
    async with CollabClient(server.url, token("alice"), backoff_max=0.3) as alice:
        a = await alice.join("restart")
        for ch in "mine ":
            a.text().insert(len(str(a.text())), ch)
        b = await node.client(server.url, "restart", params={"token": token("bob")})
        await b.wait_text("mine ")
        await b.append("theirs")
        await wait_until(lambda: text(a) == "mine theirs", what="alice sees bob")
        await b.destroy()
        await server.stop()
        assert await compacted(str(tmp_path / "collab.db"), "restart")
        restarted = await server_factory(secret=SECRET, port=server.port, compact_after_updates=3)
        await wait_until(lambda: a.connects == 2 and a.synced.is_set(), timeout=15, what="alice reconnected")
        assert (await a.undo()).applied
        assert text(a) == "theirs"
        c = await node.client(restarted.url, "restart", params={"token": token("carol")})
        await c.wait_text("theirs")
    async with CollabClient(restarted.url, token("alice")) as again:  # and from a brand-new client
        a = await again.join("restart")
        assert (await a.redo()).applied
        await c.wait_text("mine theirs")


async def test_concurrent_undo_and_edits_converge_everywhere(server_factory, node, tmp_path):
    server = await server_factory(secret=SECRET)
    db = str(tmp_path / "collab.db")
    async with CollabClient(server.url, token("alice")) as alice:
        a = await alice.join("race")
        b = await node.client(server.url, "race", params={"token": token("bob")})
        a.text().insert(0, "ALICE")
        await b.wait_text("ALICE")
        burst = asyncio.create_task(b.type_burst(120, interval_ms=4, alphabet="xyz"))
        await b.wait_for(lambda: _longer_than(b, 30), what="bob typing")
        assert (await a.undo()).applied
        typed = await burst
        await b.wait_text(typed, timeout=15)
        await wait_until(lambda: text(a) == typed, what="alice converged")
        fresh = await node.client(server.url, "race", params={"token": token("carol")})
        await fresh.wait_text(typed)
        await wait_until(lambda: stored_text_is(db, "race", typed), what="storage converged")


async def _longer_than(client, n: int) -> bool:
    return len(await client.text()) > n


@pytest.fixture
async def redis(tmp_path):
    async with RedisServer(tmp_path / "redis") as r:
        yield r


async def test_undo_from_another_node_and_redo_back_on_the_first(server_factory, tmp_path, redis, node):
    shared = str(tmp_path / "shared.db")
    nodes: list[ServerProcess] = [
        await server_factory(data_dir=tmp_path / f"node{i}", store=shared, redis=redis.url, secret=SECRET,
                             node_timeout_seconds=2, resync_seconds=2, log_level="info")
        for i in range(2)]
    watcher_1 = await node.client(nodes[0].url, "shared", params={"token": token("bob")})
    watcher_2 = await node.client(nodes[1].url, "shared", params={"token": token("carol")})
    async with CollabClient(nodes[0].url, token("alice")) as alice:
        a = await alice.join("shared")
        a.text().insert(0, "from node one. ")
        await watcher_2.wait_text("from node one. ")
    await watcher_2.append("bob was here")
    await watcher_1.wait_text("from node one. bob was here")
    async with CollabClient(nodes[1].url, token("alice")) as alice:
        a = await alice.join("shared")
        assert (await a.undo()).applied
        await watcher_1.wait_text("bob was here")
        await watcher_2.wait_text("bob was here")
    async with CollabClient(nodes[0].url, token("alice")) as alice:
        a = await alice.join("shared")
        state = await a.redo()
        assert state.applied and state.can_undo and not state.can_redo
        await watcher_2.wait_text("from node one. bob was here")
