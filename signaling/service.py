"""WebRTC signaling relay, y-webrtc compatible, authenticated and clustered.

Endpoint ``ws://host:port/signaling`` (JSON text frames, the y-webrtc signaling protocol):

client → server
    ``{"type":"subscribe","topics":[T,…]}``    join topics (a topic is a room name)
    ``{"type":"unsubscribe","topics":[T,…]}``  leave topics
    ``{"type":"publish","topic":T,"data":…}``  relay ``data`` to every subscriber of T
    ``{"type":"ping"}``                        keepalive
server → client
    ``{"type":"publish","topic":T,"data":…,"clients":N}``  every publish to T, the publisher's own
        included; N = subscribers of T across the cluster (local count + per-node counts gossiped
        over the bus; may lag a membership change on another node by one bus round trip)
    ``{"type":"pong"}``
    ``{"type":"error","message":M}`` / ``{"type":"error","topic":T,"message":M}``  a refused frame or
        topic. Messages: ``forbidden`` (token does not allow T), ``too many topics``, ``invalid topic``,
        ``invalid JSON``, ``expected a JSON object``, ``missing type``, ``unknown type``,
        ``topics must be a list``, ``rate limit exceeded``.

Access: with a server secret, the socket needs a token (``?token=``, ``Authorization: Bearer``
or sub-protocol ``bearer.<jwt>``); missing/invalid/expired → close 4401. Subscribing to or
publishing on a topic needs a token whose ``rooms`` allow it (viewer or editor).

Close codes: 4401 token, 4400 too many bad frames, 4413 frame over the size limit, 1013 rate
limit persisted / slow reader / node at capacity, 1012 server draining, 1011 internal error.

Clustering: every topic with local subscribers has a bus channel ``_signaling/<topic>``; a
publish is relayed locally and sent once on the bus (kind ``signal``), and every node relays it
to its own subscribers. Per-node subscriber counts travel on the same channel (on change, in
every publish, every ``gossip_seconds``, and on request when a node newly subscribes) and expire
when not renewed, so a dead node stops being counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import time
from collections import defaultdict, deque
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import Counter, Gauge
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from collab import closecodes
from collab.auth import AccessDenied, Identity, dev_identity, token_from, verify_token
from collab.logs import get_logger
from collab.ratelimit import TokenBucket
from collab.services import Service
from signaling.config import SignalingSettings, ice_config

if TYPE_CHECKING:
    from collab.bus import BusMessage
    from collab.hub import Hub

CHANNEL_PREFIX = "_signaling/"
MAX_TOPIC_BYTES = 512
BUS_KIND = "signal"

log = get_logger("collab.signaling")


class BadFrame(Exception):
    """A frame that is not valid signaling JSON; answered with an error, counted toward 4400."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("non-finite number")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_frame(text: str) -> dict[str, Any]:
    """Strict JSON (no NaN/Infinity, which JS ``JSON.parse`` would choke on when relayed)."""
    try:
        value = json.loads(text, parse_float=_finite_float, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise BadFrame("invalid JSON") from None
    if not isinstance(value, dict):
        raise BadFrame("expected a JSON object")
    return value


def dumps(value: Any) -> str:
    # ensure_ascii: lone surrogates from the client stay escaped and never break UTF-8 encoding.
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def topic_problem(topic: Any) -> str | None:
    if not isinstance(topic, str) or not topic:
        return "invalid topic"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "invalid topic"
    if size > MAX_TOPIC_BYTES:
        return "invalid topic"
    return None


def identify(secret: str | None, token: str | None, dev_name: str | None) -> Identity:
    if secret is None:
        return dev_identity(dev_name)
    if not token:
        raise AccessDenied("token required", closecodes.UNAUTHORIZED)
    return verify_token(secret, token)


class Peer:
    """One signaling socket: its topics, bounded outbox, limits and close state."""

    _ids = itertools.count(1)

    def __init__(self, identity: Identity, cfg: SignalingSettings, now: float) -> None:
        self.id = next(self._ids)
        self.identity = identity
        self.topics: set[str] = set()
        self.bucket = TokenBucket(cfg.rate, cfg.burst, now)
        self.bad_frames = 0
        self.dropped = 0  # frames dropped in the current rate-limit episode
        self.max_outbox = cfg.outbox_frames
        self.max_outbox_bytes = cfg.outbox_bytes
        self.outbox_bytes = 0
        self.outbox: deque[str] = deque()
        self.wakeup = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.gone = False

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    def send(self, text: str) -> None:
        if self.closing:
            return
        if len(self.outbox) >= self.max_outbox or self.outbox_bytes + len(text) > self.max_outbox_bytes:
            self.outbox.clear()
            self.outbox_bytes = 0
            self.close(closecodes.TRY_AGAIN_LATER, "slow consumer")
            return
        self.outbox.append(text)
        self.outbox_bytes += len(text)
        self.wakeup.set()

    def error(self, message: str, topic: str | None = None) -> None:
        body: dict[str, Any] = {"type": "error", "message": message}
        if topic is not None:
            body["topic"] = topic
        self.send(dumps(body))

    def close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self.wakeup.set()
        self.closed.set()


class SignalingService(Service):
    name: ClassVar[str] = "signaling"
    bus_kinds: ClassVar[frozenset[str]] = frozenset({BUS_KIND})

    def __init__(self, cfg: SignalingSettings | None = None) -> None:
        self._cfg_override = cfg
        self.cfg = cfg or SignalingSettings()
        self.hub: Hub | None = None
        self.peers: set[Peer] = set()
        self.topics: dict[str, set[Peer]] = {}
        # topic -> node -> (count, monotonic time seen)
        self.remote: dict[str, dict[str, tuple[int, float]]] = defaultdict(dict)
        self._bus_topics: set[str] = set()
        self._bus_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._accepting = True
        self._gossip_task: asyncio.Task[None] | None = None
        self._metrics_ready = False

    # -- lifetime ------------------------------------------------------------------------------

    async def start(self, hub: Hub) -> None:
        self.hub = hub
        if self._cfg_override is None:
            self.cfg = SignalingSettings.from_settings(hub.settings)
        self._setup_metrics(hub)
        self._gossip_task = hub.spawn(self._gossip_loop())

    async def stop(self) -> None:
        self._accepting = False
        for peer in list(self.peers):
            peer.close(closecodes.SERVER_RESTART, "server restarting")
        if self._gossip_task is not None:
            self._gossip_task.cancel()
        for topic in list(self._bus_topics):
            with contextlib.suppress(Exception):
                self._publish_bus(topic, {"op": "count", "n": 0})
                await self.hub.bus.unsubscribe(CHANNEL_PREFIX + topic)  # type: ignore[union-attr]
        self._bus_topics.clear()

    def _setup_metrics(self, hub: Hub) -> None:
        registry = getattr(hub.metrics, "registry", None)
        if registry is None or self._metrics_ready:
            return
        self.m_connections = Gauge("collab_signaling_connections", "Open signaling sockets", registry=registry)
        self.m_topics = Gauge("collab_signaling_topics", "Topics with local subscribers", registry=registry)
        self.m_messages = Counter("collab_signaling_messages", "Signaling frames received, by outcome",
                                  ["outcome"], registry=registry)
        self.m_relayed = Counter("collab_signaling_relayed", "Signaling frames queued to subscribers", registry=registry)
        self.m_closes = Counter("collab_signaling_closes", "Signaling sockets closed by the server, by code",
                                ["code"], registry=registry)
        self._metrics_ready = True

    def _count(self, outcome: str) -> None:
        if self._metrics_ready:
            self.m_messages.labels(outcome=outcome).inc()

    # -- routes --------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [
            WebSocketRoute("/signaling", self.endpoint),
            Route("/api/rtc/config", self.rtc_config, methods=["GET"]),
        ]

    async def rtc_config(self, request: Request) -> Response:
        token, _ = token_from(request)
        try:
            identity = identify(self.cfg.secret, token, request.query_params.get("name"))
        except AccessDenied as denied:
            return JSONResponse({"error": denied.reason}, status_code=401)
        body = ice_config(self.cfg, identity.user_id)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    # -- the websocket endpoint -----------------------------------------------------------------

    async def endpoint(self, ws: WebSocket) -> None:
        """Never raises: whatever one socket does, it pays for it alone."""
        peer: Peer | None = None
        try:
            peer = await self._admit(ws)
            if peer is not None:
                await self._serve(ws, peer)
        except Exception:  # noqa: BLE001 - the last line of defence; details stay in the log
            log.exception("signaling connection failed")
            if peer is not None:
                peer.close(closecodes.INTERNAL_ERROR, "internal error")
                await self._close(ws, peer)
        finally:
            if peer is not None:
                self._forget(peer)

    async def _admit(self, ws: WebSocket) -> Peer | None:
        token, subprotocol = token_from(ws)
        refusal: tuple[int, str] | None = None
        identity: Identity | None = None
        try:
            identity = identify(self.cfg.secret, token, ws.query_params.get("name"))
        except AccessDenied as denied:
            refusal = (denied.code, denied.reason)
        if refusal is None and (not self._accepting or (self.hub is not None and not self.hub.accepting)):
            refusal = (closecodes.SERVER_RESTART, "server draining")
        if refusal is None and len(self.peers) >= self.cfg.max_connections:
            refusal = (closecodes.TRY_AGAIN_LATER, "server at capacity")
        # Accept first, then close: a close before accept is an HTTP 403 that browsers report as 1006.
        await ws.accept(subprotocol=subprotocol)
        if refusal is not None or identity is None:
            code, reason = refusal or (closecodes.UNAUTHORIZED, "unauthenticated")
            self._closed_metric(code)
            log.info("signaling connection refused", code=code, reason=reason)
            with contextlib.suppress(Exception):
                await ws.close(code, reason)
            return None
        peer = Peer(identity, self.cfg, time.monotonic())
        self.peers.add(peer)
        if self._metrics_ready:
            self.m_connections.set(len(self.peers))
        return peer

    async def _serve(self, ws: WebSocket, peer: Peer) -> None:
        reader = asyncio.create_task(self._read_loop(ws, peer))
        writer = asyncio.create_task(self._write_loop(ws, peer))
        closer = asyncio.create_task(peer.closed.wait())
        tasks = {reader, writer, closer}
        expiry = peer.identity.expires_at
        if expiry is not None:
            tasks.add(asyncio.create_task(self._expire(peer, expiry)))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if peer.closing and not writer.done():
                # Let queued error replies go out before the close frame; a writer stuck on a
                # client that stopped reading gets two seconds, then it is cancelled.
                await asyncio.wait({writer}, timeout=2.0)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                if not task.cancelled() and task.done() and task.exception() is not None:
                    exc = task.exception()
                    if not isinstance(exc, (OSError, RuntimeError, WebSocketDisconnect)):
                        log.error("signaling task failed", error=repr(exc))
                        peer.close(closecodes.INTERNAL_ERROR, "internal error")
            self._forget(peer)
            await self._close(ws, peer)

    async def _expire(self, peer: Peer, expires_at: float) -> None:
        await asyncio.sleep(max(0.0, expires_at - time.time()))
        peer.close(closecodes.UNAUTHORIZED, "token expired")

    async def _close(self, ws: WebSocket, peer: Peer) -> None:
        if peer.close_code is None or peer.gone:
            return
        self._closed_metric(peer.close_code)
        try:
            async with asyncio.timeout(3):
                await ws.close(peer.close_code, peer.close_reason)
        except Exception:  # noqa: BLE001 - the socket may already be gone
            pass

    def _closed_metric(self, code: int) -> None:
        if self._metrics_ready:
            self.m_closes.labels(code=str(code)).inc()

    async def _write_loop(self, ws: WebSocket, peer: Peer) -> None:
        while True:
            await peer.wakeup.wait()
            peer.wakeup.clear()
            while peer.outbox:
                text = peer.outbox.popleft()
                peer.outbox_bytes -= len(text)
                await ws.send_text(text)
            if peer.closing:
                return

    async def _read_loop(self, ws: WebSocket, peer: Peer) -> None:
        cfg = self.cfg
        while not peer.closing:
            event = await ws.receive()
            if event["type"] == "websocket.disconnect":
                peer.gone = True  # nothing more to send: the client went away
                return
            text = event.get("text")
            if text is None:
                raw = event.get("bytes") or b""
                if len(raw) > cfg.max_message_bytes:
                    peer.close(closecodes.TOO_LARGE, "message too large")
                    self._count("too_large")
                    return
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = None
            elif len(text) > cfg.max_message_bytes or (
                    len(text) * 4 > cfg.max_message_bytes and len(text.encode("utf-8", "surrogatepass")) > cfg.max_message_bytes):
                peer.close(closecodes.TOO_LARGE, "message too large")
                self._count("too_large")
                return
            now = time.monotonic()
            if not peer.bucket.take(now):
                peer.dropped += 1
                self._count("rate_limited")
                if peer.dropped == 1:
                    peer.error("rate limit exceeded")
                elif peer.dropped > max(10, int(cfg.rate)):
                    peer.close(closecodes.TRY_AGAIN_LATER, "rate limit exceeded")
                    return
                continue
            peer.dropped = 0
            try:
                if text is None:
                    raise BadFrame("invalid JSON")
                await self._handle(peer, parse_frame(text))
            except BadFrame as bad:
                self._count("bad")
                peer.bad_frames += 1
                if peer.bad_frames > cfg.max_bad_frames:
                    peer.close(closecodes.BAD_MESSAGE, "too many bad frames")
                    return
                peer.error(str(bad))

    # -- messages ------------------------------------------------------------------------------

    async def _handle(self, peer: Peer, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if not isinstance(kind, str):
            raise BadFrame("missing type")
        if kind == "ping":
            self._count("ping")
            peer.send('{"type":"pong"}')
        elif kind == "publish":
            self._count("publish")
            topic = msg.get("topic")
            problem = topic_problem(topic)
            if problem:
                raise BadFrame(problem)
            if not peer.identity.allows(topic):
                peer.error("forbidden", topic)
                return
            self._publish(topic, msg.get("data"))
        elif kind == "subscribe":
            self._count("subscribe")
            topics = self._topic_list(msg)
            if len(topics) > self.cfg.max_topics:
                raise BadFrame("too many topics")
            for topic in topics:
                await self._subscribe(peer, topic)
        elif kind == "unsubscribe":
            self._count("unsubscribe")
            for topic in self._topic_list(msg):
                if isinstance(topic, str):
                    self._unsubscribe(peer, topic)
        else:
            self._count("unknown")
            peer.error("unknown type")

    @staticmethod
    def _topic_list(msg: dict[str, Any]) -> list[Any]:
        topics = msg.get("topics")
        if not isinstance(topics, list):
            raise BadFrame("topics must be a list")
        return topics

    async def _subscribe(self, peer: Peer, topic: Any) -> None:
        if topic_problem(topic):
            peer.error("invalid topic", topic if isinstance(topic, str) and len(topic) <= MAX_TOPIC_BYTES else None)
            return
        if topic in peer.topics:
            return
        if not peer.identity.allows(topic):
            peer.error("forbidden", topic)
            return
        if len(peer.topics) >= self.cfg.max_topics:
            peer.error("too many topics", topic)
            return
        peer.topics.add(topic)
        subs = self.topics.setdefault(topic, set())
        subs.add(peer)
        self._topics_metric()
        if len(subs) == 1:
            # First local subscriber: join the topic's bus channel before this connection's next
            # frame (usually its announce) is handled, so the answers can reach us.
            await self._reconcile(topic)
        else:
            self._announce_count(topic)

    def _unsubscribe(self, peer: Peer, topic: str) -> None:
        if topic not in peer.topics:
            return
        peer.topics.discard(topic)
        subs = self.topics.get(topic)
        if subs is None:
            return
        subs.discard(peer)
        if not subs:
            del self.topics[topic]
            self._spawn(self._reconcile(topic))
        else:
            self._announce_count(topic)
        self._topics_metric()

    def _forget(self, peer: Peer) -> None:
        if peer not in self.peers:
            return
        self.peers.discard(peer)
        for topic in list(peer.topics):
            self._unsubscribe(peer, topic)
        if self._metrics_ready:
            self.m_connections.set(len(self.peers))

    def _topics_metric(self) -> None:
        if self._metrics_ready:
            self.m_topics.set(len(self.topics))

    # -- relay ---------------------------------------------------------------------------------

    def clients(self, topic: str) -> int:
        """Subscribers of ``topic`` across the cluster (local + fresh gossiped counts)."""
        local = len(self.topics.get(topic, ()))
        remote = self.remote.get(topic)
        if not remote:
            return local
        horizon = time.monotonic() - 3.5 * self.cfg.gossip_seconds
        return local + sum(n for n, seen in remote.values() if seen >= horizon)

    def _publish(self, topic: str, data: Any) -> None:
        self._relay_local(topic, data)
        self._publish_bus(topic, {"op": "pub", "n": len(self.topics.get(topic, ())), "data": data})

    def _relay_local(self, topic: str, data: Any) -> None:
        subs = self.topics.get(topic)
        if not subs:
            return
        text = dumps({"type": "publish", "topic": topic, "data": data, "clients": self.clients(topic)})
        for peer in list(subs):
            peer.send(text)
        if self._metrics_ready:
            self.m_relayed.inc(len(subs))

    def _spawn(self, coro: Any) -> None:
        try:
            assert self.hub is not None
            self.hub.spawn(coro)
        except (AssertionError, RuntimeError):  # the hub is gone (shutdown): nothing left to reconcile
            coro.close()

    def _publish_bus(self, topic: str, body: dict[str, Any], target: str | None = None) -> None:
        if self.hub is None:
            return
        try:
            self.hub.bus.publish(CHANNEL_PREFIX + topic, BUS_KIND, dumps(body).encode("utf-8"), target)
        except Exception:  # noqa: BLE001 - the bus is at-most-once; a failed publish is a lost one
            log.warning("signaling bus publish failed", topic=topic, exc_info=True)

    def _announce_count(self, topic: str, target: str | None = None, hello: bool = False) -> None:
        body: dict[str, Any] = {"op": "count", "n": len(self.topics.get(topic, ()))}
        if hello:
            body["hello"] = True
        self._publish_bus(topic, body, target)

    async def _reconcile(self, topic: str) -> None:
        """Make the bus subscription of ``topic`` follow whether it has local subscribers."""
        if self.hub is None:
            return
        lock, users = self._bus_locks.get(topic) or (asyncio.Lock(), 0)
        self._bus_locks[topic] = (lock, users + 1)
        try:
            async with lock:
                want = bool(self.topics.get(topic))
                have = topic in self._bus_topics
                channel = CHANNEL_PREFIX + topic
                if want and not have:
                    await self.hub.bus.subscribe(channel)
                    self._bus_topics.add(topic)
                    self._announce_count(topic, hello=True)
                elif not want and have:
                    self._announce_count(topic)  # n = 0: the others stop counting us
                    self._bus_topics.discard(topic)
                    self.remote.pop(topic, None)
                    await self.hub.bus.unsubscribe(channel)
                elif want:
                    self._announce_count(topic)
        except Exception:  # noqa: BLE001 - local relay keeps working; the bus heals on the next change
            log.warning("signaling bus subscription failed", topic=topic, exc_info=True)
        finally:
            lock, users = self._bus_locks[topic]
            if users <= 1:
                del self._bus_locks[topic]
            else:
                self._bus_locks[topic] = (lock, users - 1)

    def on_bus(self, room: object, message: BusMessage) -> None:
        try:
            self._on_bus(message)
        except Exception:  # noqa: BLE001 - a bad bus message must never break the bus's delivery loop
            log.warning("bad signaling bus message", node=message.node, exc_info=True)

    def _on_bus(self, message: BusMessage) -> None:
        if not message.room.startswith(CHANNEL_PREFIX) or message.node == self._node_id():
            return
        topic = message.room[len(CHANNEL_PREFIX):]
        body = json.loads(message.payload)
        if not isinstance(body, dict):
            return
        n = body.get("n")
        if isinstance(n, int) and n >= 0:
            counts = self.remote[topic]
            if n == 0:
                counts.pop(message.node, None)
                if not counts:
                    self.remote.pop(topic, None)
            else:
                counts[message.node] = (n, time.monotonic())
        op = body.get("op")
        if op == "pub":
            self._relay_local(topic, body.get("data"))
        elif op == "count" and body.get("hello") and self.topics.get(topic):
            self._announce_count(topic, target=message.node)

    def _node_id(self) -> str | None:
        return self.hub.bus.node_id if self.hub is not None else None

    async def _gossip_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.gossip_seconds)
            try:
                for topic in list(self._bus_topics):
                    self._announce_count(topic)
                for topic in [t for t in self.topics if t not in self._bus_topics and t not in self._bus_locks]:
                    self._spawn(self._reconcile(topic))  # retry a bus subscription that failed
                horizon = time.monotonic() - 3.5 * self.cfg.gossip_seconds
                for topic in list(self.remote):
                    counts = self.remote[topic]
                    for node in [n for n, (_, seen) in counts.items() if seen < horizon]:
                        del counts[node]
                    if not counts:
                        del self.remote[topic]
            except Exception:  # noqa: BLE001 - housekeeping must keep running
                log.warning("signaling gossip failed", exc_info=True)
