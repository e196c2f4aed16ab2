"""Presence across nodes: the in-process bus network and real processes on a real Redis."""

from __future__ import annotations

import pytest
from servers import InProcessServer, RedisServer, wait_until
from test_presence_e2e import FeedReader, get_json, user_in
from yjs import NodeYjs

from collab.bus import LocalNetwork


async def test_workspace_and_collaborators_span_nodes_on_the_local_bus(tmp_path, node):
    network = LocalNetwork()
    async with InProcessServer(tmp_path, network=network) as n1:
        n2 = await InProcessServer(tmp_path, network=network).start()
        try:
            async with FeedReader(n1.url + "/presence?prefix=team/") as feed:
                ann = await node.client(n1.url, "team/a", params={"name": "Ann"})
                bob = await node.client(n2.url, "team/b", params={"name": "Bob"})
                await bob.insert(0, "hello world")
                await node.request("set_cursor", client=bob.name, anchor=6, head=11)
                await feed.wait("join", "team/a", "dev:Ann")
                await feed.wait("join", "team/b", "dev:Bob")  # from the other node
                workspace = await get_json(n1.http, "/api/presence", prefix="team/")
                assert [r["room"] for r in workspace["rooms"]] == ["team/a", "team/b"]
                # team/b is not loaded on n1: it is loaded to resolve cursors against the document.

                async def bob_cursor():
                    listing = await get_json(n1.http, "/api/rooms/team/b/presence")
                    user = user_in(listing, "dev:Bob")
                    clients = [c for s in (user or {}).get("sessions", []) for c in s["clients"]]
                    return clients[0]["cursor"] if clients and clients[0]["cursor"] else None

                cursor = await wait_until(bob_cursor, timeout=5, what="remote cursor resolved on n1")
                assert (cursor["anchor"], cursor["head"]) == (6, 11)
                assert ann.id
                await n2.stop()  # clean shutdown: its sessions leave the cluster
                await feed.wait("leave", "team/b", "dev:Bob")
                assert not feed.seen("leave", "team/a", "dev:Ann")
        finally:
            await n2.stop()


@pytest.fixture
async def redis(tmp_path):
    async with RedisServer(tmp_path / "redis") as r:
        yield r


async def test_presence_across_processes_on_redis_and_a_dead_nodes_users_leave(server_factory, tmp_path, redis, node):
    common = {"store": str(tmp_path / "shared.db"), "redis": redis.url, "node_timeout_seconds": 2,
              "log_level": "info"}
    n1 = await server_factory(data_dir=tmp_path / "n1", **common)
    n2 = await server_factory(data_dir=tmp_path / "n2", **common)
    async with FeedReader(n1.url + "/presence?prefix=") as feed:
        ann = await node.client(n1.url, "shared/doc", params={"name": "Ann"})
        await ann.insert(0, "one two three")
        async with NodeYjs() as other:
            bob = await other.client(n2.url, "shared/doc", params={"name": "Bob"})
            await other.client(n2.url, "only/on-two", params={"name": "Bob"})
            await bob.wait_text("one two three")
            await other.request("set_cursor", client=bob.name, anchor=4, head=7)
            await feed.wait("join", "shared/doc", "dev:Bob")
            await feed.wait("join", "only/on-two", "dev:Bob")

            async def both_with_bobs_cursor():
                listing = await get_json(n1.http, "/api/rooms/shared/doc/presence")
                bob_u = user_in(listing, "dev:Bob")
                if not bob_u or not user_in(listing, "dev:Ann"):
                    return None
                cursors = [c["cursor"] for s in bob_u["sessions"] for c in s["clients"] if c["cursor"]]
                return cursors[0] if cursors else None

            cursor = await wait_until(both_with_bobs_cursor, timeout=10, what="bob's cursor on node one")
            assert (cursor["anchor"], cursor["head"]) == (4, 7)
            await n2.kill()  # SIGKILL: no goodbye; the bus notices the silence
            await feed.wait("leave", "only/on-two", "dev:Bob", timeout=10)
            await feed.wait("leave", "shared/doc", "dev:Bob", timeout=5)

            async def bob_gone_from_ann():
                return all(s.get("user", {}).get("id") != "dev:Bob" for s in (await ann.awareness()).values())

            await wait_until(bob_gone_from_ann, timeout=5, what="bob's awareness removed")
        listing = await get_json(n1.http, "/api/presence")
        assert [r["room"] for r in listing["rooms"]] == ["shared/doc"]
