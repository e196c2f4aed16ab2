"""Real WebRTC between aiortc peers found through /signaling: data channel and voice (audio).

Loopback only: ICE host candidates are pinned to 127.0.0.1 (conftest + ``loopback=True``) and no
ICE servers are configured; every test checks the negotiated SDPs carry no other address.
"""

from __future__ import annotations

import pytest

from clients.rtc import RtcRoom
from collab.auth import issue_token
from servers import InProcessServer
from sigtools import exercise, link, signaling_of

SECRET = "signaling-secret-0123456789-abcdefghij"
@pytest.mark.parametrize("audio", [False, True], ids=["data", "data+voice"])
async def test_two_aiortc_peers_link_through_one_node(sig_server, audio):
    a, b, pa, pb, seconds = await link(sig_server.url + "/signaling", sig_server.url + "/signaling", "rtc-room",
                                       audio=audio)
    try:
        await exercise(a, b, pa, pb, audio=audio)
        print(f"\nconnect time (signaling + ICE + DTLS + SCTP, one node, audio={audio}): {seconds * 1000:.0f} ms")
    finally:
        await a.close()
        await b.close()


async def test_two_aiortc_peers_on_different_nodes(two_nodes):
    n1, n2 = two_nodes
    a, b, pa, pb, seconds = await link(n1.url + "/signaling", n2.url + "/signaling", "cross-node", audio=True)
    try:
        await exercise(a, b, pa, pb, audio=True)
        print(f"\nconnect time across nodes (bus): {seconds * 1000:.0f} ms")
        # each node counts the other's subscriber (gossip on the bus)
        assert signaling_of(n1).clients("cross-node") == 2
        assert signaling_of(n2).clients("cross-node") == 2
    finally:
        await a.close()
        await b.close()


async def test_peers_with_tokens_and_a_third_peer_joining(tmp_path):
    async with InProcessServer(tmp_path, secret=SECRET) as srv:
        url = srv.url + "/signaling"
        tokens = [issue_token(SECRET, user=u, rooms=["call-*"], role=r) for u, r in
                  (("ann", "editor"), ("ben", "viewer"), ("cat", "editor"))]
        a, b, pa, pb, _ = await link(url, url, "call-1", token_a=tokens[0], token_b=tokens[1])
        c = RtcRoom(url, "call-1", token=tokens[2], loopback=True)
        try:
            await c.start()
            # c's announce reaches a and b; both initiate towards c, which ends with two links
            got = [await c.wait_peer(20), await c.wait_peer(20)]
            assert {p.remote_id for p in got} == {a.peer_id, b.peer_id}
            for p in got:
                p.send("hi from c")
            assert await (a.peers[c.peer_id]).recv() == "hi from c"
            assert await (b.peers[c.peer_id]).recv() == "hi from c"
            # a stranger's token cannot even see the room
            stranger = RtcRoom(url, "call-1", token=issue_token(SECRET, user="eve", rooms=["other"]), loopback=True)
            await stranger.start()
            err = await stranger.signaling.next(lambda m: m.get("type") == "error")
            assert err == {"type": "error", "topic": "call-1", "message": "forbidden"}
            await stranger.close()
        finally:
            for r in (a, b, c):
                await r.close()


def test_loopback_mode_pins_host_candidates_and_restores_what_it_replaced():
    import aioice.ice

    from clients.rtc import restrict_to_loopback

    before = aioice.ice.get_host_addresses  # the conftest's guard
    with restrict_to_loopback():
        with restrict_to_loopback():
            assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1"]
    assert aioice.ice.get_host_addresses is before
