"""Identity comes from signed tokens; refusals use codes stock clients respect; viewers can't edit."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from websockets.asyncio.client import connect

from clients import YClient
from collab.auth import issue_token
from servers import SECRET
from servers import wait_until


@pytest.fixture
async def secure(server_factory):
    return await server_factory(secret=SECRET)


def token(**kw) -> str:
    kw.setdefault("user", "alice")
    return issue_token(SECRET, **kw)


async def test_missing_invalid_and_expired_tokens_close_4401_and_stock_clients_stop(secure, node):
    for params in ({}, {"token": "not-a-jwt"}, {"token": issue_token("another-secret-0123456789", user="x")},
                   {"token": token(ttl_seconds=-10)}):
        client = await node.client(secure.url, "team/a", params=params, wait_synced=False)
        event = await client.wait_event("closed", timeout=5)  # y-websocket gives up on 44xx
        assert event["code"] == 4401, params
        assert not (await client.status())["should_connect"]


async def test_room_outside_the_token_pattern_closes_4403(secure):
    t = token(rooms=["team/*"])
    async with YClient(secure.url, "team/inside", token=t) as ok:
        assert ok.synced.is_set()
    bad = YClient(secure.url, "other/room", token=t)
    with pytest.raises(Exception):
        await bad.connect(timeout=5)
    assert bad.close_code == 4403


async def test_token_accepted_from_header_and_subprotocol(secure):
    t = token()
    async with connect(secure.url + "/hdr", additional_headers={"Authorization": f"Bearer {t}"},
                       ping_interval=None) as ws:
        assert (await asyncio.wait_for(ws.recv(), 5))[:2] == b"\x00\x00"  # server's sync step 1
    async with connect(secure.url + "/sub", subprotocols=[f"bearer.{t}"], ping_interval=None) as ws:
        assert ws.subprotocol == f"bearer.{t}"
        assert (await asyncio.wait_for(ws.recv(), 5))[:2] == b"\x00\x00"


async def test_viewer_syncs_and_shares_presence_but_none_of_its_edits_reach_anyone(secure, node):
    editor = await node.client(secure.url, "doc", params={"token": token(user="ed")})
    await editor.insert(0, "original")
    viewer = await node.client(secure.url, "doc", params={"token": token(user="vi", role="viewer")},
                               awareness={"user": {"name": "Viewer"}})
    await viewer.wait_text("original")
    await viewer.insert(0, "VIEWER EDIT ")  # applied locally by the stock client, never by the server
    await viewer.wait_event("permission-denied", timeout=5)
    await editor.wait_for(lambda: _has(editor, viewer.id), timeout=5, what="viewer presence")
    await editor.append(" + more")
    await editor.wait_text("original + more")
    async with YClient(secure.url, "doc", token=token(user="late")) as late:
        assert late.text() == "original + more"
    assert await secure.metric("collab_updates_rejected_total") >= 1


async def _has(client, cid):
    return cid in await client.awareness()


async def test_open_token_expires_while_connected_and_is_closed_4401(secure):
    async with YClient(secure.url, "ttl", token=token(ttl_seconds=2)) as c:
        code, reason = await c.wait_closed(timeout=10)
    assert code == 4401 and "expired" in reason


async def test_tokens_never_reach_the_logs(secure):
    t = token()
    async with YClient(secure.url, "secret-room", token=t):
        pass
    async with connect(secure.url + "/x", additional_headers={"Authorization": f"Bearer {t}"}, ping_interval=None):
        pass
    await wait_until(lambda: "secret-room" in secure.logs(), timeout=5, what="connection logged")
    logs = secure.logs()
    assert t not in logs and t.split(".")[2] not in logs
    assert "token=[redacted]" in logs or "secret-room" in logs


def test_collab_token_cli_prints_a_verifiable_token_on_its_last_line():
    done = subprocess.run([sys.executable, "-m", "collab", "token", "--user", "alice", "--name", "Alice",
                           "--room", "team/*", "--role", "viewer", "--ttl", "1h", "--secret", SECRET],
                          capture_output=True, text=True, check=True)
    from collab.auth import verify_token

    identity = verify_token(SECRET, done.stdout.strip().splitlines()[-1])
    assert (identity.user_id, identity.name, identity.role, identity.rooms) == ("alice", "Alice", "viewer", ("team/*",))
    assert identity.allows("team/x") and not identity.allows("other")


async def test_dev_mode_viewer_link_is_enforced_by_the_server(server, node):
    editor = await node.client(server.url, "dev-view", params={"name": "Ed"})
    await editor.insert(0, "base")
    viewer = await node.client(server.url, "dev-view", params={"name": "Vi", "role": "viewer"})
    await viewer.wait_text("base")
    await viewer.append(" forced")
    await viewer.wait_event("permission-denied", timeout=5)
    await editor.append("!")
    async with YClient(server.url, "dev-view") as fresh:
        await fresh.wait_for(lambda: fresh.text() == "base!", timeout=5, what="only the editor's edit")
