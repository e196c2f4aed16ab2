"""Signaling across nodes over the real Redis bus (a private redis-server on loopback)."""

from __future__ import annotations

import shutil

import pytest

from servers import InProcessServer, RedisServer, wait_until
from sigtools import client, exercise, link, publish_of, signaling_of

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


async def test_peers_on_two_nodes_link_over_redis_and_counts_follow(tmp_path):
    async with RedisServer(tmp_path / "redis") as redis:
        async with (InProcessServer(tmp_path / "n1", redis=redis.url) as n1,
                    InProcessServer(tmp_path / "n2", redis=redis.url) as n2):
            await wait_until(lambda: n1.hub.bus.healthy and n2.hub.bus.healthy, what="redis bus up")
            a, b, pa, pb, seconds = await link(n1.url + "/signaling", n2.url + "/signaling", "over-redis", audio=True)
            try:
                await exercise(a, b, pa, pb, audio=True)
                print(f"\nconnect time across nodes (Redis bus): {seconds * 1000:.0f} ms")
                await wait_until(lambda: signaling_of(n1).clients("over-redis") == 2
                                 and signaling_of(n2).clients("over-redis") == 2, what="cluster-wide counts")
            finally:
                await b.close()
            # b left node 2: node 1 stops counting it as soon as node 2's count (0) arrives
            await wait_until(lambda: signaling_of(n1).clients("over-redis") == 1, what="count after leave")
            watcher = await client(n2)
            await watcher.subscribe("over-redis")
            await wait_until(lambda: signaling_of(n1).clients("over-redis") == 2, what="count after join")
            await a.signaling.publish("over-redis", {"type": "announce", "from": "someone"})
            got = await watcher.next(publish_of("over-redis"))
            assert got["clients"] == 2 and got["data"]["from"] == "someone"
            await watcher.close()
            await a.close()
            await wait_until(lambda: not signaling_of(n1).topics and not signaling_of(n2).topics, what="topics gone")
