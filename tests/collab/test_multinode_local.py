"""Two hubs on one in-process bus network: the multi-node paths without Redis."""

from __future__ import annotations

from collab.bus import LocalNetwork
from servers import InProcessServer


async def test_edits_and_awareness_cross_nodes_on_the_local_bus(tmp_path, node):
    network = LocalNetwork()
    async with InProcessServer(tmp_path, network=network) as n1, InProcessServer(tmp_path, network=network) as n2:
        a = await node.client(n1.url, "shared", awareness={"user": {"name": "A"}})
        b = await node.client(n2.url, "shared")
        await a.insert(0, "from node one ")
        await b.wait_text("from node one ")
        await b.append("and node two")
        await a.wait_text("from node one and node two")
        await b.wait_for(lambda: _has(b, a.id), timeout=5, what="awareness across nodes")


async def _has(client, cid):
    return cid in await client.awareness()
