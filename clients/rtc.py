"""Direct WebRTC links between peers of a room (data channel + audio), via the signaling endpoint.

Speaks y-webrtc's signaling messages, so a Python peer is shaped like a browser peer:

* on connect: ``{"type":"subscribe","topics":[room]}`` then publish ``{"type":"announce","from":me}``
* whoever *receives* an announce initiates: publishes
  ``{"type":"signal","from":me,"to":them,"token":<glare token>,"signal":{"type":"offer","sdp":…}}``
* the other answers with ``signal: {"type":"answer","sdp":…}``; trickled
  ``signal: {"type":"candidate","candidate":{"candidate","sdpMLineIndex","sdpMid"}}`` are accepted
  (aiortc itself does not trickle: its candidates travel inside the SDP)
* glare (both offered): the offer with the larger token wins, as in y-webrtc.

Usage::

    async with RtcRoom("ws://127.0.0.1:1234/signaling", "my-room", token=jwt,
                       audio_track=ToneTrack(), receive_audio=True) as room:
        peer = await room.wait_peer()
        await peer.wait_open()
        peer.send("hello")
        print(await peer.recv())
        track = await peer.wait_audio()        # the remote voice
        frame = await track.recv()             # av.AudioFrame

ICE servers: pass ``ice_servers`` (e.g. from :func:`fetch_ice_servers`, which reads
``/api/rtc/config`` with its short-lived TURN credentials). ``loopback=True`` is the test mode:
no ICE servers and host candidates restricted to 127.0.0.1 (:func:`restrict_to_loopback`), so no
packet leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import math
import random
import time
import uuid
from array import array
from collections.abc import Callable, Iterator
from typing import Any

import aioice.ice
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError
from aiortc.sdp import candidate_from_sdp
from av import AudioFrame
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed

__all__ = [
    "RtcPeer", "RtcRoom", "SignalingClient", "SignalingError", "ToneTrack", "fetch_ice_servers",
    "ice_servers_from_config", "restrict_to_loopback",
]

# -- loopback (test) mode --------------------------------------------------------------------------

_loopback_users = 0
_saved_get_host_addresses: Callable[[bool, bool], list[str]] | None = None


def _loopback_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"] if use_ipv4 else []


@contextlib.contextmanager
def restrict_to_loopback() -> Iterator[None]:
    """Gather ICE host candidates on 127.0.0.1 only, for the duration (process-wide: aioice
    reads its interface list from a module function). Nestable; restores what it replaced."""
    global _loopback_users, _saved_get_host_addresses
    if _loopback_users == 0:
        _saved_get_host_addresses = aioice.ice.get_host_addresses
    _loopback_users += 1
    aioice.ice.get_host_addresses = _loopback_addresses
    try:
        yield
    finally:
        _loopback_users -= 1
        if _loopback_users == 0 and _saved_get_host_addresses is not None:
            aioice.ice.get_host_addresses = _saved_get_host_addresses


# -- ICE configuration --------------------------------------------------------------------------


def ice_servers_from_config(body: dict[str, Any]) -> list[RTCIceServer]:
    """``/api/rtc/config``'s ``iceServers`` as aiortc objects."""
    servers = []
    for entry in body.get("iceServers", []):
        servers.append(RTCIceServer(urls=entry["urls"], username=entry.get("username"),
                                    credential=entry.get("credential")))
    return servers


async def fetch_ice_servers(http_url: str, token: str | None = None) -> list[RTCIceServer]:
    """GET ``<http_url>/api/rtc/config`` (Bearer token) and convert its ICE servers."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient() as client:
        response = await client.get(http_url.rstrip("/") + "/api/rtc/config", headers=headers, timeout=10)
        response.raise_for_status()
        return ice_servers_from_config(response.json())


# -- a tone for voice tests -----------------------------------------------------------------------


class ToneTrack(AudioStreamTrack):
    """A sine tone (default 440 Hz), 20 ms frames of 48 kHz mono s16: a stand-in microphone."""

    kind = "audio"

    def __init__(self, frequency: float = 440.0, sample_rate: int = 48_000, amplitude: float = 0.3) -> None:
        super().__init__()
        self.frequency = frequency
        self.sample_rate = sample_rate
        self.amplitude = amplitude
        self._samples = int(sample_rate * 0.02)
        self._pts = 0
        self._start: float | None = None

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            wait = self._start + self._pts / self.sample_rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        step = 2 * math.pi * self.frequency / self.sample_rate
        scale = self.amplitude * 32767
        pcm = array("h", (int(math.sin(step * (self._pts + i)) * scale) for i in range(self._samples)))
        frame = AudioFrame(format="s16", layout="mono", samples=self._samples)
        frame.planes[0].update(pcm.tobytes())
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, self.sample_rate)
        self._pts += self._samples
        return frame


# -- the signaling socket ---------------------------------------------------------------------------


class SignalingError(ConnectionError):
    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"signaling closed with {code}: {reason}")
        self.code = code
        self.reason = reason


class SignalingClient:
    """One y-webrtc signaling socket. ``messages`` receives every server frame (parsed)."""

    def __init__(self, url: str, token: str | None = None, unix_socket: str | None = None) -> None:
        self.url = url
        self.token = token
        self.unix_socket = unix_socket  # reach the server through a unix socket (the URL gives the path)
        self.ws: ClientConnection | None = None
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.errors: list[dict[str, Any]] = []
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self._reader: asyncio.Task[None] | None = None
        self._handlers: list[Callable[[dict[str, Any]], None]] = []

    async def connect(self) -> SignalingClient:
        url = self.url
        if self.token:
            url += ("&" if "?" in url else "?") + "token=" + self.token
        if self.unix_socket:
            self.ws = await unix_connect(self.unix_socket, url, max_size=None, open_timeout=10)
        else:
            self.ws = await connect(url, max_size=None, open_timeout=10)
        self._reader = asyncio.create_task(self._read())
        return self

    def on_message(self, handler: Callable[[dict[str, Any]], None]) -> None:
        self._handlers.append(handler)

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for raw in self.ws:
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(message, dict):
                    continue
                if message.get("type") == "error":
                    self.errors.append(message)
                self.messages.put_nowait(message)
                for handler in list(self._handlers):
                    handler(message)
        except ConnectionClosed:
            pass
        finally:
            if self.ws.close_code is not None:
                self.close_code = self.ws.close_code
                self.close_reason = self.ws.close_reason or ""
            self.closed.set()

    async def send(self, message: dict[str, Any]) -> None:
        if self.ws is None:
            raise SignalingError(None, "not connected")
        try:
            await self.ws.send(json.dumps(message))
        except ConnectionClosed as exc:
            raise SignalingError(self.ws.close_code, self.ws.close_reason or "") from exc

    async def subscribe(self, *topics: str) -> None:
        await self.send({"type": "subscribe", "topics": list(topics)})

    async def unsubscribe(self, *topics: str) -> None:
        await self.send({"type": "unsubscribe", "topics": list(topics)})

    async def publish(self, topic: str, data: Any) -> None:
        await self.send({"type": "publish", "topic": topic, "data": data})

    async def ping(self) -> None:
        await self.send({"type": "ping"})

    async def next(self, predicate: Callable[[dict[str, Any]], bool] | None = None,
                   timeout: float = 10.0) -> dict[str, Any]:
        """The next frame (matching ``predicate``); earlier non-matching frames are discarded."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.messages.get()
                if predicate is None or predicate(message):
                    return message

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._reader


# -- peers ------------------------------------------------------------------------------------------


class RtcPeer:
    """A WebRTC link to one remote peer: a data channel and, if negotiated, audio both ways."""

    def __init__(self, room: RtcRoom, remote_id: str, initiator: bool) -> None:
        self.room = room
        self.remote_id = remote_id
        self.initiator = initiator
        self.glare_token: float | None = None
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=list(room.ice_servers)))
        self.channel: RTCDataChannel | None = None
        self.opened = asyncio.Event()
        self.closed = asyncio.Event()
        self.messages: asyncio.Queue[str | bytes] = asyncio.Queue()
        self.audio_tracks: asyncio.Queue[MediaStreamTrack] = asyncio.Queue()
        self.created = time.monotonic()
        self.connected_after: float | None = None  # seconds from creation to data channel open
        self._pending_candidates: list[dict[str, Any]] = []

        @self.pc.on("datachannel")
        def _on_datachannel(channel: RTCDataChannel) -> None:
            self._bind(channel)

        @self.pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self.audio_tracks.put_nowait(track)

        @self.pc.on("connectionstatechange")
        async def _on_state() -> None:
            if self.pc.connectionState in ("failed", "closed"):
                await self.close()

    def _bind(self, channel: RTCDataChannel) -> None:
        if self.channel is not None:
            return
        self.channel = channel

        @channel.on("open")
        def _on_open() -> None:
            self._opened()

        @channel.on("message")
        def _on_message(message: str | bytes) -> None:
            self.messages.put_nowait(message)

        @channel.on("close")
        def _on_close() -> None:
            self.room._spawn(self.close())

        if channel.readyState == "open":
            self._opened()

    def _opened(self) -> None:
        if not self.opened.is_set():
            self.connected_after = time.monotonic() - self.created
            self.opened.set()
            self.room._peer_ready(self)

    def _add_media(self) -> None:
        room = self.room
        if room.audio_track is not None:
            self.pc.addTrack(room._outgoing_audio())
        elif room.receive_audio and self.initiator:
            self.pc.addTransceiver("audio", direction="recvonly")

    async def _signal(self, signal: dict[str, Any]) -> None:
        if self.glare_token is None:
            self.glare_token = time.time() * 1000 + random.random()
        await self.room._publish({"type": "signal", "from": self.room.peer_id, "to": self.remote_id,
                                  "token": self.glare_token, "signal": signal})

    async def offer(self) -> None:
        # The token is fixed before any await, so glare is decided the same way on both sides.
        self.glare_token = time.time() * 1000 + random.random()
        self._bind(self.pc.createDataChannel(self.room.channel_label))
        self._add_media()
        await self.pc.setLocalDescription(await self.pc.createOffer())  # gathers every candidate
        await self._signal({"type": "offer", "sdp": self.pc.localDescription.sdp})

    async def answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        await self._flush_candidates()
        if self.room.audio_track is not None:
            self.pc.addTrack(self.room._outgoing_audio())  # reuses the offered audio transceiver
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        await self._signal({"type": "answer", "sdp": self.pc.localDescription.sdp})

    async def accept_answer(self, sdp: str) -> None:
        if self.pc.signalingState != "have-local-offer":
            return
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        await self._flush_candidates()

    async def add_candidate(self, candidate: dict[str, Any]) -> None:
        if self.pc.remoteDescription is None:
            self._pending_candidates.append(candidate)
            return
        text = candidate.get("candidate") or ""
        if not text:
            return  # end of candidates
        if text.startswith("candidate:"):
            text = text[len("candidate:"):]
        parsed = candidate_from_sdp(text)
        parsed.sdpMid = candidate.get("sdpMid")
        parsed.sdpMLineIndex = candidate.get("sdpMLineIndex")
        await self.pc.addIceCandidate(parsed)

    async def _flush_candidates(self) -> None:
        pending, self._pending_candidates = self._pending_candidates, []
        for candidate in pending:
            with contextlib.suppress(Exception):
                await self.add_candidate(candidate)

    # -- public API --

    async def wait_open(self, timeout: float = 15.0) -> RtcPeer:
        async with asyncio.timeout(timeout):
            await self.opened.wait()
        return self

    def send(self, data: str | bytes) -> None:
        if self.channel is None or self.channel.readyState != "open":
            raise ConnectionError("data channel not open")
        self.channel.send(data)

    async def recv(self, timeout: float = 10.0) -> str | bytes:
        async with asyncio.timeout(timeout):
            return await self.messages.get()

    async def wait_audio(self, timeout: float = 15.0) -> MediaStreamTrack:
        async with asyncio.timeout(timeout):
            return await self.audio_tracks.get()

    async def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        if self.room.peers.get(self.remote_id) is self:
            del self.room.peers[self.remote_id]
        with contextlib.suppress(Exception):
            await self.pc.close()


class RtcRoom:
    """Join ``room`` on a y-webrtc signaling server and link up with every peer announcing there."""

    def __init__(self, signaling_url: str, room: str, *, token: str | None = None, peer_id: str | None = None,
                 ice_servers: list[RTCIceServer] | None = None, loopback: bool = False,
                 audio_track: MediaStreamTrack | None = None, receive_audio: bool = False,
                 channel_label: str = "collab", max_conns: int = 20, unix_socket: str | None = None) -> None:
        self.room = room
        self.peer_id = peer_id or str(uuid.uuid4())
        self.loopback = loopback
        self.ice_servers = [] if loopback or ice_servers is None else list(ice_servers)
        self.audio_track = audio_track
        self.receive_audio = receive_audio
        self.channel_label = channel_label
        self.max_conns = max_conns
        self.signaling = SignalingClient(signaling_url, token, unix_socket)
        self.peers: dict[str, RtcPeer] = {}
        self.ready: asyncio.Queue[RtcPeer] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._loopback_cm: contextlib.AbstractContextManager[None] | None = None
        self._relay = MediaRelay() if audio_track is not None else None

    async def __aenter__(self) -> RtcRoom:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> RtcRoom:
        if self.loopback:
            self._loopback_cm = restrict_to_loopback()
            self._loopback_cm.__enter__()
        self.signaling.on_message(self._on_message)
        await self.signaling.connect()
        await self.signaling.subscribe(self.room)
        await self.announce()
        return self

    async def announce(self) -> None:
        await self._publish({"type": "announce", "from": self.peer_id})

    async def _publish(self, data: dict[str, Any]) -> None:
        await self.signaling.publish(self.room, data)

    def _outgoing_audio(self) -> MediaStreamTrack:
        """One subscription of the local audio per peer (a track can feed only one sender)."""
        assert self.audio_track is not None and self._relay is not None
        return self._relay.subscribe(self.audio_track, buffered=False)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _peer_ready(self, peer: RtcPeer) -> None:
        self.ready.put_nowait(peer)

    def _on_message(self, message: dict[str, Any]) -> None:
        if message.get("type") != "publish" or message.get("topic") != self.room:
            return
        data = message.get("data")
        if not isinstance(data, dict):
            return  # an encrypted (password) room or a stranger's payload: not ours to read
        sender = data.get("from")
        if not isinstance(sender, str) or sender == self.peer_id:
            return
        if data.get("to") is not None and data.get("to") != self.peer_id:
            return
        self._spawn(self._handle(sender, data))

    async def _handle(self, sender: str, data: dict[str, Any]) -> None:
        # One remote peer's messages are handled in arrival order (an offer before its candidates);
        # different peers proceed independently. Tasks start in creation order and asyncio.Lock is FIFO.
        async with self._locks.setdefault(sender, asyncio.Lock()):
            await self._handle_in_order(sender, data)

    async def _handle_in_order(self, sender: str, data: dict[str, Any]) -> None:
        try:
            kind = data.get("type")
            if kind == "announce":
                if sender not in self.peers and len(self.peers) < self.max_conns:
                    peer = self.peers[sender] = RtcPeer(self, sender, initiator=True)
                    await peer.offer()
            elif kind == "signal":
                signal = data.get("signal")
                if not isinstance(signal, dict):
                    return
                stype = signal.get("type")
                if stype == "offer":
                    existing = self.peers.get(sender)
                    if existing is not None:
                        remote_token = data.get("token")
                        local = existing.glare_token
                        if local is not None and isinstance(remote_token, (int, float)) and local > remote_token:
                            return  # glare: our offer wins, theirs is dropped
                        await existing.close()
                    peer = self.peers[sender] = RtcPeer(self, sender, initiator=False)
                    await peer.answer(signal["sdp"])
                elif stype == "answer":
                    peer = self.peers.get(sender)
                    if peer is not None:
                        await peer.accept_answer(signal["sdp"])
                elif stype == "candidate":
                    peer = self.peers.get(sender)
                    if peer is not None and isinstance(signal.get("candidate"), dict):
                        await peer.add_candidate(signal["candidate"])
        except Exception:  # noqa: BLE001 - one bad remote peer must not stop the room
            peer = self.peers.get(sender)
            if peer is not None:
                await peer.close()

    async def wait_peer(self, timeout: float = 15.0) -> RtcPeer:
        """The next peer whose data channel opened."""
        async with asyncio.timeout(timeout):
            return await self.ready.get()

    async def close(self) -> None:
        for peer in list(self.peers.values()):
            await peer.close()
        with contextlib.suppress(Exception):
            await self.signaling.unsubscribe(self.room)
        await self.signaling.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._loopback_cm is not None:
            self._loopback_cm.__exit__(None, None, None)
            self._loopback_cm = None
