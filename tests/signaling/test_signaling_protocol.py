"""The y-webrtc signaling protocol on /signaling: relay, access, limits and hostile input."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from collab.auth import issue_token
from servers import InProcessServer, wait_until
from sigtools import client, expect_error, frame, publish_of, raw, signaling_of, tune

SECRET = "signaling-secret-0123456789-abcdefghij"


async def test_subscribe_publish_ping_and_clients_count(sig_server):
    a = await client(sig_server)
    b = await client(sig_server)
    await a.subscribe("room-1")
    await b.subscribe("room-1")
    await a.ping()
    assert (await a.next(lambda m: m["type"] == "pong"))["type"] == "pong"
    await b.ping()  # b's subscribe is handled once its pong arrives (frames are handled in order)
    await b.next(lambda m: m["type"] == "pong")
    await a.publish("room-1", {"type": "announce", "from": "peer-a"})
    for c in (a, b):  # the publisher gets its own publish too, like the reference server
        got = await c.next(publish_of("room-1"))
        assert got == {"type": "publish", "topic": "room-1", "data": {"type": "announce", "from": "peer-a"},
                       "clients": 2}
    await b.unsubscribe("room-1")
    await b.ping()
    await b.next(lambda m: m["type"] == "pong")
    await a.publish("room-1", "after")
    assert (await a.next(publish_of("room-1")))["clients"] == 1
    await b.ping()
    await b.next(lambda m: m["type"] == "pong")
    assert b.messages.empty(), "unsubscribed client still receives the topic"
    # publishing without subscribing is allowed (as with the reference server)
    await b.publish("room-1", "from outside")
    assert (await a.next(publish_of("room-1")))["data"] == "from outside"
    await a.close()
    await b.close()
    service = signaling_of(sig_server)
    await wait_until(lambda: not service.topics and not service.peers, what="topics forgotten")


async def test_topics_are_isolated_and_any_json_data_is_relayed(sig_server):
    a, b = await client(sig_server), await client(sig_server)
    await a.subscribe("x", "y")
    await b.subscribe("y")
    await b.ping()
    await b.next(lambda m: m["type"] == "pong")
    payloads = ["encrypted-base64==", 1, None, [1, {"a": "é\u2603"}], {"to": "p", "signal": {"type": "offer", "sdp": "v=0"}}]
    for data in payloads:
        await a.publish("y", data)
        assert (await b.next(publish_of("y")))["data"] == data
    await a.publish("x", "only a")
    assert (await a.next(publish_of("x")))["data"] == "only a"
    await b.ping()
    await b.next(lambda m: m["type"] == "pong")
    assert b.messages.empty()
    await a.close()
    await b.close()


async def test_garbage_frames_get_errors_and_never_crash(sig_server):
    tune(sig_server, max_bad_frames=50)
    bystander = await client(sig_server)
    await bystander.subscribe("t")
    ws = await raw(sig_server)
    bad = [
        "not json", "{", "[]", "42", '"str"', "null", "{}", '{"type": 5}',
        '{"type":"subscribe"}', '{"type":"subscribe","topics":"t"}', '{"type":"publish"}',
        '{"type":"publish","topic":["t"]}', '{"type":"publish","topic":"t","data":NaN}',
        '{"type":"publish","topic":"t","data":1e999}', "[" * 5000 + "]" * 5000,
    ]
    for text in bad:
        await ws.send(text)
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply["type"] == "error", (text[:40], reply)
        assert isinstance(reply["message"], str)
    # unknown types and invalid topics are refused without counting as garbage
    await ws.send(frame({"type": "teleport"}))
    assert json.loads(await ws.recv()) == {"type": "error", "message": "unknown type"}
    await ws.send(frame({"type": "subscribe", "topics": ["", 7, "x" * 600, "ok"]}))
    errors = [json.loads(await ws.recv()) for _ in range(3)]
    assert all(e["message"] == "invalid topic" for e in errors)
    # binary frames holding JSON are accepted (the reference server parses them too)
    await ws.send(frame({"type": "ping"}).encode())
    assert json.loads(await ws.recv()) == {"type": "pong"}
    await ws.send(b"\xff\xfe\x00")
    assert json.loads(await ws.recv())["message"] == "invalid JSON"
    await ws.close()
    # the server and everybody else carry on
    other = await client(sig_server)
    await other.publish("t", "still here")
    assert (await bystander.next(publish_of("t")))["data"] == "still here"
    assert (await httpx.AsyncClient().get(sig_server.http + "/healthz")).status_code == 200
    await bystander.close()
    await other.close()


async def test_garbage_flood_closes_4400_and_others_unaffected(sig_server):
    tune(sig_server, max_bad_frames=5)
    bystander = await client(sig_server)
    await bystander.subscribe("t")
    ws = await raw(sig_server)
    with pytest.raises(ConnectionClosed):
        for _ in range(50):
            await ws.send("garbage")
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 4400 and ws.close_reason == "too many bad frames"
    await bystander.publish("t", "alive")
    assert (await bystander.next(publish_of("t")))["data"] == "alive"
    await bystander.close()


async def test_too_large_closes_4413(sig_server):
    tune(sig_server, max_message_bytes=4096)
    bystander = await client(sig_server)
    await bystander.subscribe("t")
    big = await client(sig_server)
    await big.subscribe("t")
    await big.publish("t", "x" * 5000)
    await asyncio.wait_for(big.closed.wait(), 5)
    assert big.close_code == 4413
    # multi-byte characters: the limit counts UTF-8 bytes
    big2 = await client(sig_server)
    await big2.publish("t", "é" * 2100)
    await asyncio.wait_for(big2.closed.wait(), 5)
    assert big2.close_code == 4413
    await bystander.publish("t", "x" * 3000)
    assert len((await bystander.next(publish_of("t")))["data"]) == 3000
    await bystander.close()


async def test_rate_limit_error_then_1013_others_unaffected(sig_server):
    tune(sig_server, rate=10.0, burst=20)
    bystander = await client(sig_server)
    await bystander.subscribe("t")
    flooder = await client(sig_server)
    await flooder.subscribe("t")
    try:
        for i in range(200):
            await flooder.publish("t", i)
    except Exception:  # noqa: BLE001 - the server may close while we still write
        pass
    await asyncio.wait_for(flooder.closed.wait(), 5)
    assert flooder.close_code == 1013
    assert [e["message"] for e in flooder.errors] == ["rate limit exceeded"]
    # the bystander saw at most the flooder's burst, and its own traffic still flows
    relayed = []
    while not bystander.messages.empty():
        relayed.append(bystander.messages.get_nowait())
    assert len([m for m in relayed if m.get("type") == "publish"]) <= 21
    await bystander.publish("t", "mine")
    assert (await bystander.next(publish_of("t", lambda d: d == "mine")))["data"] == "mine"
    await bystander.close()


async def test_a_short_burst_over_the_rate_is_only_an_error(sig_server):
    tune(sig_server, rate=20.0, burst=5)
    c = await client(sig_server)
    for _ in range(8):
        await c.ping()
    await expect_error(c, "rate limit exceeded")
    peer = next(iter(signaling_of(sig_server).peers))
    bucket = peer.bucket
    await wait_until(lambda: bucket.tokens + (time.monotonic() - bucket.stamp) * bucket.rate >= 2,
                     what="bucket refilled")
    await c.ping()
    await c.next(lambda m: m["type"] == "pong")
    assert c.close_code is None
    await c.close()


async def test_topic_limit_per_connection(sig_server):
    tune(sig_server, max_topics=3)
    c = await client(sig_server)
    await c.subscribe("a", "b")
    await c.subscribe("c", "d")
    assert (await expect_error(c, "too many topics"))["topic"] == "d"
    await c.subscribe("1", "2", "3", "4")  # more than the limit in one frame: refused whole
    assert await expect_error(c, "too many topics") == {"type": "error", "message": "too many topics"}
    assert signaling_of(sig_server).topics.keys() == {"a", "b", "c"}
    await c.unsubscribe("a")
    await c.subscribe("d")
    await c.publish("d", 1)
    assert (await c.next(publish_of("d")))["data"] == 1
    await c.close()


async def test_slow_reader_is_closed_1013(sig_server):
    tune(sig_server, outbox_frames=8)
    fast = await client(sig_server)
    await fast.subscribe("t")
    service = signaling_of(sig_server)
    slow = await raw(sig_server)
    await slow.send(frame({"type": "subscribe", "topics": ["t"]}))
    await wait_until(lambda: len(service.topics.get("t", ())) == 2, what="slow subscribed")
    slow_peer = max(service.peers, key=lambda p: p.id)  # the newest socket
    for i in range(8):  # fill its outbox synchronously (nothing awaits in between)
        slow_peer.send(frame({"n": i}))
    slow_peer.send("one too many")
    assert slow_peer.close_code == 1013 and slow_peer.close_reason == "slow consumer"
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(slow.recv(), 5)
    assert slow.close_code == 1013
    await fast.publish("t", "ok")
    assert (await fast.next(publish_of("t")))["data"] == "ok"
    await fast.close()


# -- access --------------------------------------------------------------------------------------


@pytest.fixture
async def secure_server(tmp_path):
    async with InProcessServer(tmp_path, secret=SECRET) as srv:
        yield srv


async def test_without_or_with_a_bad_token_the_socket_closes_4401(secure_server):
    for token in (None, "not-a-jwt", issue_token("some-other-secret-0123456789-abcdefghij", user="u")):
        c = await client(secure_server, token)
        await asyncio.wait_for(c.closed.wait(), 5)
        assert c.close_code == 4401, token
    expired = issue_token(SECRET, user="u", ttl_seconds=-10)
    c = await client(secure_server, expired)
    await asyncio.wait_for(c.closed.wait(), 5)
    assert (c.close_code, c.close_reason) == (4401, "token expired")


async def test_token_allows_its_rooms_only(secure_server):
    alice = await client(secure_server, issue_token(SECRET, user="alice", rooms=["team-*"], role="viewer"))
    mallory = await client(secure_server, issue_token(SECRET, user="mallory", rooms=["public"]))
    await alice.subscribe("team-a", "secret-room")
    assert (await expect_error(alice, "forbidden")) == {"type": "error", "topic": "secret-room", "message": "forbidden"}
    await mallory.subscribe("team-a")
    await expect_error(mallory, "forbidden", "team-a")
    await mallory.publish("team-a", "intrusion")
    await expect_error(mallory, "forbidden", "team-a")
    # alice (viewer) is subscribed to team-a only, and nothing of mallory's reached her
    await alice.publish("team-a", "hello team")
    assert (await alice.next(publish_of("team-a")))["data"] == "hello team"
    assert [m for m in alice.errors if m.get("topic") == "team-a"] == []
    service = signaling_of(secure_server)
    assert set(service.topics) == {"team-a"} and len(service.topics["team-a"]) == 1
    # the token also travels as Authorization: Bearer or a bearer.<jwt> sub-protocol
    from websockets.asyncio.client import connect

    token = issue_token(SECRET, user="bob", rooms=["team-a"])
    async with connect(secure_server.url + "/signaling", additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        await ws.send(frame({"type": "subscribe", "topics": ["team-a"]}))
        await ws.send(frame({"type": "ping"}))
        assert json.loads(await ws.recv()) == {"type": "pong"}
    async with connect(secure_server.url + "/signaling", subprotocols=[f"bearer.{token}"]) as ws:
        assert ws.subprotocol == f"bearer.{token}"
        await ws.send(frame({"type": "ping"}))
        assert json.loads(await ws.recv()) == {"type": "pong"}
    await alice.close()
    await mallory.close()


async def test_token_expiry_closes_open_socket_4401(secure_server):
    token = issue_token(SECRET, user="brief", ttl_seconds=2, now=time.time() - 1)  # ~1 s left
    c = await client(secure_server, token)
    await c.subscribe("r")
    await asyncio.wait_for(c.closed.wait(), 5)
    assert (c.close_code, c.close_reason) == (4401, "token expired")
    await wait_until(lambda: not signaling_of(secure_server).topics, what="expired subscriber removed")


async def test_drain_closes_signaling_sockets_1012(tmp_path):
    srv = await InProcessServer(tmp_path).start()
    c = await client(srv)
    await c.subscribe("r")
    await c.ping()
    await c.next(lambda m: m["type"] == "pong")
    await srv.stop()
    await asyncio.wait_for(c.closed.wait(), 10)
    assert c.close_code == 1012


async def test_a_client_that_stops_reading_is_dropped_1013(sig_server):
    """A real stalled reader (TCP backpressure): its outbox fills, it is closed, the rest flows."""
    from websockets.asyncio.client import connect

    service = tune(sig_server, outbox_bytes=256 * 1024, rate=10_000.0, burst=10_000, max_message_bytes=64 * 1024)
    publisher = await client(sig_server)
    await publisher.subscribe("t")
    stalled = await connect(sig_server.url + "/signaling", max_queue=1, max_size=None, close_timeout=1)
    await stalled.send(frame({"type": "subscribe", "topics": ["t"]}))
    await wait_until(lambda: len(service.topics.get("t", ())) == 2, what="stalled reader subscribed")
    stalled_peer = max(service.peers, key=lambda p: p.id)
    chunk = "x" * 60_000
    async def flood() -> bool:
        await publisher.publish("t", chunk)
        await publisher.next(publish_of("t"))  # the publisher itself keeps reading fine
        return stalled_peer.closing
    await wait_until(flood, timeout=30, interval=0, what="stalled reader closed")
    assert (stalled_peer.close_code, stalled_peer.close_reason) == (1013, "slow consumer")
    await wait_until(lambda: stalled_peer not in service.peers, timeout=10, what="stalled reader forgotten")
    await publisher.publish("t", "small")
    assert (await publisher.next(publish_of("t", lambda d: d == "small")))["data"] == "small"
    await publisher.close()
    await stalled.close()
