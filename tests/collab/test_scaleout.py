"""Several `collab serve` processes behind a load balancer, fanned out through a real Redis, with
shared storage: edits converge and nothing is lost when nodes die or Redis stops."""

from __future__ import annotations

import asyncio
import string

import pycrdt
import pytest

from clients import YClient
from servers import RedisServer, TcpBalancer, wait_until
from storage import open_store
from yjs import NodeYjs

FAST = {"node_timeout_seconds": 2, "resync_seconds": 2, "log_level": "info"}


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    """Shared storage: one SQLite file for nodes on one host, PostgreSQL for nodes across hosts."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return str(tmp_path / "shared.db")


@pytest.fixture
async def redis(tmp_path):
    async with RedisServer(tmp_path / "redis") as r:
        yield r


async def start_nodes(server_factory, tmp_path, redis, store_url, n=2, **extra):
    return [await server_factory(data_dir=tmp_path / f"node{i}", store=store_url, redis=redis.url, **FAST, **extra)
            for i in range(n)]


async def stored_text(store_url: str, room: str) -> str:
    store = open_store(store_url)
    await store.open()
    try:
        state = await store.load(room)
    finally:
        await store.close()
    doc = pycrdt.Doc()
    if state.snapshot:
        doc.apply_update(state.snapshot)
    for update in state.updates:
        doc.apply_update(update)
    return str(doc.get("text", type=pycrdt.Text))


async def texts(clients):
    return [await c.text() for c in clients]


async def converged(clients, length=None):
    values = await texts(clients)
    return len(set(values)) == 1 and (length is None or len(values[0]) == length)


async def test_edits_and_presence_cross_nodes_and_presence_leaves_with_the_client(
        server_factory, tmp_path, redis, store_url, node):
    n1, n2 = await start_nodes(server_factory, tmp_path, redis, store_url)
    a = await node.client(n1.url, "team/doc")
    b = await node.client(n2.url, "team/doc")
    await asyncio.gather(a.insert(0, "alpha "), b.insert(0, "beta "))
    await wait_until(lambda: converged([a, b], len("alpha beta ")), timeout=10, what="cross-node convergence")

    async with NodeYjs() as other:
        c = await other.client(n1.url, "team/doc", awareness={"user": {"name": "Cleo"}})
        await b.wait_for(lambda: _has(b, c.id), timeout=5, what="presence across nodes")
        await other.kill()
        await b.wait_for(lambda: _lacks(b, c.id), timeout=5, what="presence removal across nodes")


async def _has(client, cid):
    return cid in await client.awareness()


async def _lacks(client, cid):
    return cid not in await client.awareness()


async def test_node_started_later_serves_the_full_document_at_once(server_factory, tmp_path, redis, store_url, node):
    (n1,) = await start_nodes(server_factory, tmp_path, redis, store_url, n=1)
    a = await node.client(n1.url, "later")
    await a.type_burst(200, interval_ms=1)
    expected = await a.text()
    n2 = (await start_nodes(server_factory, tmp_path / "late", redis, store_url, n=1))[0]
    async with YClient(n2.url, "later") as fresh:
        assert fresh.text() == expected


async def test_kill_9_of_a_node_during_typing_loses_no_update(server_factory, tmp_path, redis, store_url):
    n1, n2 = await start_nodes(server_factory, tmp_path, redis, store_url)
    lb_a = await TcpBalancer([n1.port, n2.port]).start()  # prefers node 1
    lb_b = await TcpBalancer([n2.port, n1.port]).start()  # prefers node 2
    alphabets = [string.ascii_lowercase, string.ascii_uppercase, "0123456789", "!#$%&()*+,-./:;<=>?@[]^_{|}~"]
    try:
        async with NodeYjs() as node:
            writers = [await node.client(lb.url, "typing") for lb in (lb_a, lb_a, lb_b, lb_b)]
            bursts = [asyncio.create_task(w.type_burst(300, interval_ms=5, alphabet=alpha))
                      for w, alpha in zip(writers, alphabets)]
            await writers[2].wait_for(lambda: _len_at_least(writers[2], 200), timeout=20, what="typing under way")
            await n1.kill()  # writers 0 and 1 lose their node mid-burst and reconnect through the balancer
            typed = await asyncio.gather(*bursts)
            total = sum(len(t) for t in typed)
            await wait_until(lambda: converged(writers, total), timeout=20, what="convergence after kill -9")
            final = await writers[0].text()
            for alphabet, text in zip(alphabets, typed):
                assert "".join(ch for ch in final if ch in alphabet) == text
            for w in writers:
                await w.destroy()
        await wait_until(lambda: _stored_is(store_url, final), timeout=10, what="storage to hold everything")
    finally:
        await lb_a.stop()
        await lb_b.stop()


async def _len_at_least(client, n):
    return len(await client.text()) >= n


async def _stored_is(store_url, expected):
    return await stored_text(store_url, "typing") == expected


@pytest.mark.parametrize("fault", ["restart", "freeze"])
async def test_clients_converge_after_redis_restart_or_freeze(server_factory, tmp_path, redis, store_url, node, fault):
    n1, n2 = await start_nodes(server_factory, tmp_path, redis, store_url)
    a = await node.client(n1.url, "weather")
    b = await node.client(n2.url, "weather")
    burst_a = asyncio.create_task(a.type_burst(300, interval_ms=5, alphabet="abc"))
    burst_b = asyncio.create_task(b.type_burst(300, interval_ms=5, alphabet="XYZ"))
    await a.wait_for(lambda: _len_at_least(a, 100), timeout=10, what="typing under way")
    if fault == "restart":
        await redis.stop()
        await asyncio.gather(burst_a, burst_b)  # typing goes on while Redis is down
        await redis.start()
    else:
        redis.freeze()
        await asyncio.gather(burst_a, burst_b)
        redis.thaw()
    loop = asyncio.get_running_loop()
    back = loop.time()
    await wait_until(lambda: converged([a, b], 600), timeout=10, what="convergence after Redis returns")
    assert loop.time() - back < 10
    await wait_until(lambda: _ready(n1), timeout=10, what="node 1 ready (bus healthy) again")


async def _ready(srv):
    body = (await srv.get("/readyz")).json()
    return body["checks"]["bus"] == "ok"
