"""The Python client SDK against a real server and stock Yjs clients."""

from __future__ import annotations

import asyncio
import warnings

import pytest
from servers import SECRET, wait_until

from clients import CollabClient, Forbidden, RequestFailed, Unauthorized
from clients.sdk import full_jitter
from collab.auth import issue_token

warnings.filterwarnings("ignore", message="The HMAC key")


async def test_join_returns_a_synced_doc_and_edits_flow_both_ways(server, node):
    yjs = await node.client(server.url, "notes/a")
    await yjs.insert(0, "before ")
    async with CollabClient(server.url) as client:
        room = await client.join("notes/a")
        assert str(room.text()) == "before "
        room.text().insert(7, "python ")
        await yjs.wait_text("before python ")
        await yjs.append("yjs")
        await wait_until(lambda: str(room.text()) == "before python yjs", what="remote edit applied")


async def test_presence_states_and_change_events(server, node):
    async with CollabClient(server.url) as client:
        room = await client.join("team/presence")
        changes = []
        room.presence.on_change(changes.append)
        stream = room.presence.changes()
        room.presence.set({"status": "writing"})
        assert (await asyncio.wait_for(anext(stream), 5)).local
        yjs = await node.client(server.url, "team/presence", awareness={"status": "reading"})
        await yjs.wait_for(lambda: _status(yjs, room.doc.client_id, "writing"), what="yjs sees the SDK's presence")
        await wait_until(lambda: (room.presence.remote.get(yjs.id) or {}).get("status") == "reading",
                         what="SDK sees yjs presence")
        assert any(yjs.id in change.added for change in changes)
        await yjs.set_awareness({"status": "reading", "cursor": 3})
        await wait_until(lambda: any(yjs.id in c.updated for c in changes), what="update event")
        room.presence.set({"status": "idle"})
        await yjs.wait_for(lambda: _status(yjs, room.doc.client_id, "idle"), what="yjs sees the new state")
        await yjs.destroy()
        await wait_until(lambda: yjs.id not in room.presence.states, what="removal")
        assert any(yjs.id in change.removed for change in changes)
        await stream.aclose()


async def _status(yjs, client_id: int, status: str) -> bool:
    return ((await yjs.awareness()).get(client_id) or {}).get("status") == status


async def test_reconnects_after_a_restart_and_resyncs_both_ways(server_factory, node):
    server = await server_factory()
    async with CollabClient(server.url, backoff_max=0.5) as client:
        room = await client.join("resync")
        room.text().insert(0, "online ")
        yjs = await node.client(server.url, "resync")
        await yjs.wait_text("online ")
        await yjs.destroy()
        await server.stop()
        await wait_until(lambda: not room.connected, what="SDK noticed the drop")
        room.text().insert(7, "offline ")  # kept locally, sent by the resync
        restarted = await server_factory(port=server.port)
        other = await node.client(restarted.url, "resync")
        await other.append("meanwhile")
        # Both inserts sit right after "online ": their order is Yjs's (by client id) — the same everywhere.
        expected = {"online offline meanwhile", "online meanwhileoffline "}
        await wait_until(lambda: str(room.text()) in expected, timeout=15, what="SDK resynced")
        await other.wait_text(str(room.text()))
        assert room.connects == 2 and room.error is None


async def test_permanent_refusals_raise_typed_errors_and_are_not_retried(server_factory):
    server = await server_factory(secret=SECRET)
    async with CollabClient(server.url, "not-a-token") as client:
        with pytest.raises(Unauthorized) as refused:
            await client.join("doc", timeout=10)
        assert refused.value.code == 4401
    token = issue_token(SECRET, user="ada", rooms=["team/*"])
    async with CollabClient(server.url, token) as client:
        with pytest.raises(Forbidden):
            await client.join("elsewhere", timeout=10)
        room = await client.join("team/doc")
        assert room.connects == 1


async def test_requests_get_their_reply_or_a_typed_error(server):
    async with CollabClient(server.url) as client:
        room = await client.join("requests")
        with pytest.raises(RequestFailed) as failed:
            await room.request({"type": "no.such.service"})
        assert failed.value.code == "unknown-type"
        state = await room.refresh_undo_state()
        assert not state.can_undo and not state.can_redo


def test_backoff_is_full_jitter_and_capped():
    for attempt in range(12):
        delays = [full_jitter(attempt, 0.1, 5.0) for _ in range(200)]
        assert all(0 <= d <= min(5.0, 0.1 * 2 ** attempt) for d in delays)
    assert max(full_jitter(10, 0.1, 5.0) for _ in range(200)) > 2.5  # spread, not a fixed step
