"""Helpers shared by the signaling tests."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from typing import Any

from websockets.asyncio.client import connect

from clients.rtc import RtcPeer, RtcRoom, SignalingClient, ToneTrack
from servers import InProcessServer
from signaling import SignalingService


def signaling_of(srv: InProcessServer) -> SignalingService:
    for service in srv.hub.services:
        if isinstance(service, SignalingService):
            return service
    raise AssertionError("signaling service not registered")


def tune(srv: InProcessServer, **limits) -> SignalingService:
    """Change the service's limits (they are read when a socket connects)."""
    service = signaling_of(srv)
    service.cfg = dataclasses.replace(service.cfg, **limits)
    return service


async def client(srv: InProcessServer, token: str | None = None, query: str = "") -> SignalingClient:
    return await SignalingClient(srv.url + "/signaling" + query, token).connect()


async def raw(srv: InProcessServer, query: str = ""):
    """A bare websocket to /signaling, for frames SignalingClient would never send."""
    return await connect(srv.url + "/signaling" + query, max_size=None)


def publish_of(topic: str, predicate=None):
    def match(message: dict[str, Any]) -> bool:
        return message.get("type") == "publish" and message.get("topic") == topic and (
            predicate is None or predicate(message.get("data")))
    return match


async def expect_error(c: SignalingClient, message: str | None = None, topic: str | None = None,
                       timeout: float = 5.0) -> dict[str, Any]:
    def match(m: dict[str, Any]) -> bool:
        return m.get("type") == "error" and (message is None or m.get("message") == message) and (
            topic is None or m.get("topic") == topic)
    return await c.next(match, timeout=timeout)


def frame(obj: Any) -> str:
    return json.dumps(obj)


CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) ", re.M)


def assert_loopback_only(peer: RtcPeer) -> None:
    for description in (peer.pc.localDescription, peer.pc.remoteDescription):
        addresses = set(CANDIDATE.findall(description.sdp))
        assert addresses == {"127.0.0.1"}, addresses


async def link(url_a: str, url_b: str, room: str, *, token_a: str | None = None, token_b: str | None = None,
               audio: bool = False) -> tuple[RtcRoom, RtcRoom, RtcPeer, RtcPeer, float]:
    a = RtcRoom(url_a, room, token=token_a, loopback=True, audio_track=ToneTrack() if audio else None)
    b = RtcRoom(url_b, room, token=token_b, loopback=True, receive_audio=audio)
    started = time.perf_counter()
    await a.start()
    await b.start()  # b's announce reaches a, which offers (y-webrtc: the announce's receiver initiates)
    pa, pb = await asyncio.gather(a.wait_peer(20), b.wait_peer(20))
    return a, b, pa, pb, time.perf_counter() - started


async def exercise(a: RtcRoom, b: RtcRoom, pa: RtcPeer, pb: RtcPeer, *, audio: bool) -> None:
    assert pa.remote_id == b.peer_id and pb.remote_id == a.peer_id
    assert pa.initiator and not pb.initiator
    assert_loopback_only(pa)
    assert_loopback_only(pb)
    pa.send("hello from a")
    assert await pb.recv() == "hello from a"
    pb.send(b"\x00\x01binary from b")
    assert await pa.recv() == b"\x00\x01binary from b"
    for i in range(50):
        pa.send(f"m{i}")
    assert [await pb.recv() for _ in range(50)] == [f"m{i}" for i in range(50)]
    if audio:
        track = await pb.wait_audio()
        frames = []
        async with asyncio.timeout(15):
            while len(frames) < 10:
                frames.append(await track.recv())
        assert all(f.sample_rate > 0 and f.samples > 0 for f in frames)
        # the tone is audible: decoded samples are not silence
        assert max(peak(f) for f in frames[-5:]) > 1000


def peak(frame) -> int:
    """Largest absolute s16 sample of a decoded audio frame (packed s16, any channel count)."""
    from array import array

    assert frame.format.name == "s16", frame.format.name
    count = frame.samples * len(frame.layout.channels)
    samples = array("h", bytes(frame.planes[0])[: count * 2])
    return max(abs(v) for v in samples)
