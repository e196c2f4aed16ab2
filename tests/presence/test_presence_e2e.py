"""Presence with real Yjs clients against one server: identity, collaborators, idle, workspace feed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Self

import httpx
from servers import InProcessServer, wait_until
from websockets.asyncio.client import connect
from yjs import NodeYjs

from clients import YClient
from collab.auth import issue_token
from collab.protocol import AwarenessEntry, encode_awareness
from presence import PresenceService, PresenceSettings

SECRET = "presence-test-secret-0123456789ab"


def token(user: str, name: str, role: str = "editor", rooms=("*",)) -> str:
    return issue_token(SECRET, user=user, name=name, role=role, rooms=list(rooms))


class FakeClock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def get_json(base: str, path: str, **params) -> dict:
    async with httpx.AsyncClient() as client:
        r = await client.get(base + path, params=params, timeout=5)
    assert r.status_code == 200, (r.status_code, r.text)
    return r.json()


class FeedReader:
    """A websocket subscriber of the workspace feed, collecting events as they come."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[dict] = []
        self.snapshot: dict | None = None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Self:
        self.ws = await connect(self.url, ping_interval=None)
        self.snapshot = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for text in self.ws:
                self.events.append(json.loads(text))

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        if self._task:
            self._task.cancel()

    def seen(self, kind: str, room: str, user: str) -> bool:
        return any(e["type"] == kind and e["room"] == room and e["user"]["id"] == user for e in self.events)

    async def wait(self, kind: str, room: str, user: str, timeout: float = 5) -> None:
        await wait_until(lambda: self.seen(kind, room, user), timeout=timeout, what=f"{kind} {user} in {room}")


def user_in(listing: dict, user_id: str) -> dict | None:
    return next((u for u in listing["users"] if u["id"] == user_id), None)


async def test_spoofing_another_users_client_id_is_refused_and_identity_is_stamped(server_factory, node):
    srv = await server_factory(secret=SECRET)
    room = "team/spoof"
    victim = await node.client(srv.url, room, params={"token": token("alice", "Alice")},
                               awareness={"user": {"name": "Alice's laptop", "color": "#00ff00"}})
    watcher = await node.client(srv.url, room, params={"token": token("carol", "Carol")})

    async def victim_state():
        return (await watcher.awareness()).get(victim.id)

    state = await wait_until(victim_state, timeout=5, what="victim presence")
    assert state["user"] == {"id": "alice", "name": "Alice", "color": "#00ff00", "colorLight": "#00ff0033",
                             "role": "editor"}
    async with YClient(srv.url, room, token=token("mallory", "Mallory")) as attacker:
        forged = AwarenessEntry(victim.id, 999, '{"user":{"id":"alice","name":"Alice"},"cursor":null}')
        await attacker.send_raw(encode_awareness([forged]))
        await attacker.send_raw(encode_awareness([AwarenessEntry(victim.id, 1000, "null")]))
        await attacker.set_awareness({"user": {"id": "alice", "name": "Alice"}})  # posing in its own state
        await wait_until(lambda: _metric_at_least(srv, "collab_awareness_rejected_total", 2), timeout=5,
                         what="spoofs counted")

        async def attacker_state():
            return (await watcher.awareness()).get(attacker.doc.client_id)

        posing = await wait_until(attacker_state, timeout=5, what="attacker's own presence")
        assert posing["user"]["id"] == "mallory" and posing["user"]["name"] == "Mallory"
    assert await victim_state() == state


async def _metric_at_least(srv, name, n):
    return await srv.metric(name) >= n


async def test_collaborators_list_shows_users_roles_and_cursors_that_follow_concurrent_edits(server_factory, node):
    srv = await server_factory(secret=SECRET)
    room = "team/doc"
    alice1 = await node.client(srv.url, room, params={"token": token("alice", "Alice")},
                               awareness={"user": {"name": "not really alice"}})
    await alice1.insert(0, "hello world")
    alice2 = await node.client(srv.url, room, params={"token": token("alice", "Alice")})
    bob = await node.client(srv.url, room, params={"token": token("bob", "Bob", role="viewer")})
    carol = await node.client(srv.url, room, params={"token": token("carol", "Carol")})
    for c in (alice2, bob, carol):
        await c.wait_text("hello world")
    await node.request("set_cursor", client=alice1.name, anchor=6, head=8)  # "wo"
    await node.request("set_cursor", client=bob.name, anchor=0, head=5)  # "hello"
    path = f"/api/rooms/{room}/presence"

    async def cursors_known():
        listing = await get_json(srv.http, path, token=token("carol", "Carol"))
        cursors = [c["cursor"] for u in listing["users"] for s in u["sessions"] for c in s["clients"] if c["cursor"]]
        return listing if len(cursors) == 2 else None

    await wait_until(cursors_known, timeout=5, what="cursors reach the server")
    # Two users edit at the same time, before and inside the text the cursors point into.
    await asyncio.gather(alice2.insert(0, ">> "), carol.delete(1, 2))
    for c in (alice1, alice2, bob, carol):
        await c.wait_text(">> hlo world")
    listing = await cursors_known()
    assert listing["room"] == room and listing["hidden_viewers"] == 0
    assert sorted(u["id"] for u in listing["users"]) == ["alice", "bob", "carol"]
    alice, bob_u, carol_u = (user_in(listing, u) for u in ("alice", "bob", "carol"))
    assert alice["name"] == "Alice" and alice["role"] == "editor" and not alice["read_only"]
    assert len(alice["sessions"]) == 2  # one user, two tabs
    assert bob_u["role"] == "viewer" and bob_u["read_only"] is True
    assert carol_u["role"] == "editor" and not alice["idle"]
    assert alice["connected_at"] <= time.time() and alice["last_active"] >= alice["connected_at"] - 1
    alice_cursor = next(c["cursor"] for s in alice["sessions"] for c in s["clients"] if c["cursor"])
    bob_cursor = next(c["cursor"] for s in bob_u["sessions"] for c in s["clients"] if c["cursor"])
    assert (alice_cursor["anchor"], alice_cursor["head"]) == (7, 9)  # still "wo" in ">> hlo world"
    assert (bob_cursor["anchor"], bob_cursor["head"], bob_cursor["type"]) == (3, 6, "text")
    assert (bob_cursor["from"], bob_cursor["to"]) == (3, 6)
    # The viewer's own stamped state says read-only, for UIs drawing its cursor.
    bob_state = (await carol.awareness())[bob.id]
    assert bob_state["user"]["readOnly"] is True and bob_state["user"]["role"] == "viewer"
    # Access follows the token.
    async with httpx.AsyncClient() as client:
        denied = await client.get(srv.http + path, params={"token": token("x", "X", rooms=["other/*"])})
        anonymous = await client.get(srv.http + path)
    assert denied.status_code == 403 and anonymous.status_code == 401


async def test_idle_flips_after_the_idle_time_on_an_injected_clock(tmp_path, node):
    clock = FakeClock()
    service = PresenceService(PresenceSettings(idle_seconds=10))
    async with (InProcessServer(tmp_path, clock=clock, services=[service]) as srv,
                FeedReader(srv.url + "/presence?prefix=idle/") as feed):
        ann = await node.client(srv.url, "idle/doc", params={"name": "Ann"}, awareness={"cursor": None})
        await feed.wait("join", "idle/doc", "dev:Ann")
        path = "/api/rooms/idle/doc/presence"
        assert not user_in(await get_json(srv.http, path), "dev:Ann")["idle"]
        clock.advance(9)
        service.tick()
        assert not user_in(await get_json(srv.http, path), "dev:Ann")["idle"]
        clock.advance(2)
        service.tick()
        await feed.wait("idle", "idle/doc", "dev:Ann")
        assert user_in(await get_json(srv.http, path), "dev:Ann")["idle"]
        workspace = await get_json(srv.http, "/api/presence", prefix="idle/")
        assert workspace["rooms"][0]["users"][0]["idle"] is True
        await ann.insert(0, "typing")  # an edit is activity
        await feed.wait("active", "idle/doc", "dev:Ann")
        assert not user_in(await get_json(srv.http, path), "dev:Ann")["idle"]


async def test_workspace_feed_reports_joins_and_leaves_across_two_rooms(server, node):
    events: list[tuple[str, dict]] = []

    async def sse() -> None:
        url = server.http + "/api/presence/events"
        async with httpx.AsyncClient(timeout=None) as client, client.stream("GET", url, params={"prefix": "team/"}) as r:
            kind = None
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line[6:])))

    sse_task = asyncio.create_task(sse())
    try:
        async with FeedReader(server.url + "/presence?prefix=team/") as feed:
            assert feed.snapshot == {"type": "snapshot", "prefix": "team/", "rooms": []}
            ann1 = await node.client(server.url, "team/a", params={"name": "Ann"})
            await feed.wait("join", "team/a", "dev:Ann")
            async with NodeYjs() as other:
                bob = await other.client(server.url, "team/b", params={"name": "Bob"})
                await other.client(server.url, "elsewhere/c", params={"name": "Cid"})
                ann2 = await node.client(server.url, "team/a", params={"name": "Ann"})  # a second tab
                await feed.wait("join", "team/b", "dev:Bob")
                workspace = await get_json(server.http, "/api/presence", prefix="team/")
                assert [(r["room"], [u["id"] for u in r["users"]]) for r in workspace["rooms"]] == [
                    ("team/a", ["dev:Ann"]), ("team/b", ["dev:Bob"])]
                assert workspace["rooms"][0]["users"][0]["sessions"] == 2
                await ann1.destroy()
                await other.kill()  # abrupt: no close frames
                await feed.wait("leave", "team/b", "dev:Bob")
                assert bob.id
            assert not feed.seen("leave", "team/a", "dev:Ann")  # her second tab is still there
            await ann2.destroy()
            await feed.wait("leave", "team/a", "dev:Ann")
            assert not any(e["room"].startswith("elsewhere") for e in feed.events)
            assert [e["type"] for e in feed.events if e["room"] == "team/a"] == ["join", "leave"]
        await wait_until(lambda: [k for k, e in events if e.get("room") == "team/a"] == ["join", "leave"],
                         timeout=5, what="the same events on SSE")
        assert events[0][0] == "snapshot"
    finally:
        sse_task.cancel()


async def test_rooms_with_more_states_than_one_message_may_hold_keep_every_client(tmp_path, node):
    """Clients echo every awareness message they apply; the server splits big batches so that no
    echo exceeds the entry limit it enforces (which would close the client with 4400)."""
    async with InProcessServer(tmp_path, max_awareness_entries=8) as srv:
        clients = [await node.client(srv.url, "crowd", awareness={"n": i}) for i in range(20)]
        late = await node.client(srv.url, "crowd", awareness={"n": "late"})

        async def everyone_sees_everyone():
            return len(await late.awareness()) == 21 and len(await clients[0].awareness()) == 21

        await wait_until(everyone_sees_everyone, timeout=10, what="21 states everywhere")
        await asyncio.gather(*(c.set_awareness({"n": i, "moved": True}) for i, c in enumerate(clients)))
        await wait_until(lambda: _all_moved(late, 20), timeout=10, what="moves relayed")
        for c in [*clients, late]:
            assert (await c.status())["connected"] and await c.closes() == [], c


async def _all_moved(client, n):
    return sum(1 for s in (await client.awareness()).values() if isinstance(s, dict) and s.get("moved")) == n
