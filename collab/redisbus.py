"""The Redis bus: room-scoped fan-out between nodes over Redis pub/sub.

Theory of operation
-------------------
* One channel per room (``collab:room:<name>``) plus one for node heartbeats. Only nodes that
  have a room loaded subscribe to it, so nobody does work for rooms it does not serve.
* Envelope: msgpack ``[1, node, room, kind, seq, payload, target]``. ``seq`` counts, per
  (sending node, room), everything that node published to the room; a receiver that sees a jump
  has lost messages and asks the hub to re-sync that room by state vector.
* Pub/sub is at-most-once, so correctness never depends on it: the hub re-syncs rooms on load,
  on gaps, after every reconnect (``_resync`` for all rooms) and periodically.
* Publishing never blocks a room: frames go to a bounded queue drained by one publisher task
  in pipelined batches. While Redis is unreachable the queue is dropped (counted) — the
  re-sync after reconnect repairs what peers missed.
* Heartbeats every ``heartbeat_seconds``; a peer silent for ``node_timeout`` (or saying "bye" on
  shutdown) is reported dead, and the hub removes its clients' presence. Our own heartbeat
  coming back is the watchdog for a frozen Redis (SIGSTOP): no echo for ``node_timeout`` →
  reconnect.
* Reconnect with exponential backoff and full jitter (0.1 s … 5 s), then resubscribe every
  channel and re-sync every room. ``healthy`` is False meanwhile (``/readyz`` says degraded).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import msgpack
import redis.asyncio as aioredis

from collab.bus import BusMessage
from collab.logs import get_logger

ENVELOPE_VERSION = 1
ROOM_PREFIX = "collab:room:"
NODES_CHANNEL = "collab:nodes"
MAX_PENDING = 50_000  # frames queued for Redis before we drop (peers re-sync)
MAX_BATCH = 512  # PUBLISH commands per pipeline round trip

log = get_logger("collab.redisbus")


class RedisBus:
    def __init__(self, url: str, node_id: str, deliver: Callable[[BusMessage], None], *,
                 heartbeat_seconds: float = 1.0, node_timeout: float = 5.0, metrics: Any = None) -> None:
        self.url = url
        self.node_id = node_id
        self._deliver = deliver
        self.heartbeat_seconds = heartbeat_seconds
        self.node_timeout = node_timeout
        self.metrics = metrics
        self._rooms: set[str] = set()
        self._seq: dict[str, int] = defaultdict(int)
        self._seen: dict[tuple[str, str], int] = {}
        self._peers: dict[str, float] = {}
        self._pending: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._healthy = False
        self._connected = asyncio.Event()
        self._pubsub: Any = None
        self._client: aioredis.Redis | None = None
        self._last_echo = time.monotonic()
        self._stopping = False

    @property
    def healthy(self) -> bool:
        return self._healthy

    # -- the Bus interface ---------------------------------------------------------------------

    async def start(self) -> None:
        """Nothing to do: the hub runs ``run()`` in its task group."""

    async def stop(self) -> None:
        self._stopping = True
        if self._client is not None and self._healthy:
            try:
                async with asyncio.timeout(1):
                    await self._client.publish(NODES_CHANNEL, msgpack.packb([self.node_id, "bye", time.time()]))
            except Exception:  # noqa: BLE001 - best effort; peers time us out anyway
                pass

    async def subscribe(self, room: str) -> None:
        self._rooms.add(room)
        await self._subscribe_now([ROOM_PREFIX + room])

    async def unsubscribe(self, room: str) -> None:
        self._rooms.discard(room)
        for key in [k for k in self._seen if k[1] == room]:
            del self._seen[key]
        pubsub = self._pubsub
        if pubsub is not None and self._healthy:
            try:
                async with asyncio.timeout(1):
                    await pubsub.unsubscribe(ROOM_PREFIX + room)
            except Exception:  # noqa: BLE001 - a later reconnect subscribes only to current rooms
                pass

    def publish(self, room: str, kind: str, payload: bytes, target: str | None = None) -> None:
        self._seq[room] += 1
        if not self._healthy:
            self._count("dropped")
            return
        if len(self._pending) >= MAX_PENDING:
            self._count("dropped")
            return
        envelope = msgpack.packb([ENVELOPE_VERSION, self.node_id, room, kind, self._seq[room], payload, target])
        self._pending.append((ROOM_PREFIX + room, envelope))
        self._wake.set()

    # -- running -------------------------------------------------------------------------------

    async def run(self) -> None:
        attempt = 0
        while not self._stopping:
            try:
                await self._session()
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any Redis failure means reconnect
                if self._healthy:
                    log.warning("redis connection lost; serving local clients only until it returns", error=str(exc))
                self._set_healthy(False)
                attempt += 1
                delay = random.uniform(0.1, min(5.0, 0.1 * 2**attempt))  # full jitter
                await asyncio.sleep(delay)
            finally:
                await self._disconnect()

    async def _session(self) -> None:
        client = aioredis.from_url(self.url, socket_timeout=2.0, socket_connect_timeout=2.0,
                                   health_check_interval=0, retry_on_timeout=False)
        self._client = client
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._pubsub = pubsub
        await pubsub.subscribe(NODES_CHANNEL, *(ROOM_PREFIX + r for r in self._rooms))
        self._pending.clear()
        self._seen.clear()
        self._last_echo = time.monotonic()
        self._set_healthy(True)
        self._count("reconnects")
        log.info("redis connected", rooms=len(self._rooms))
        # Whatever happened while we were away, peers and we compare state vectors now.
        self._deliver(BusMessage(self.node_id, "", "_resync", 0, b""))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._listen(pubsub))
            tg.create_task(self._publish_loop(client))
            tg.create_task(self._heartbeat(client))

    async def _disconnect(self) -> None:
        pubsub, client = self._pubsub, self._client
        self._pubsub = self._client = None
        for closer in (getattr(pubsub, "aclose", None), getattr(client, "aclose", None)):
            if closer is not None:
                try:
                    async with asyncio.timeout(1):
                        await closer()
                except Exception:  # noqa: BLE001 - the connection is already broken
                    pass

    async def _subscribe_now(self, channels: list[str]) -> None:
        pubsub = self._pubsub
        if pubsub is None or not self._healthy:
            return  # the next session subscribes to every current room
        try:
            async with asyncio.timeout(2):
                await pubsub.subscribe(*channels)
        except Exception:  # noqa: BLE001 - degraded: local clients are still served
            log.warning("redis subscribe failed; will retry on reconnect", channels=len(channels))

    def _set_healthy(self, value: bool) -> None:
        self._healthy = value
        if self.metrics is not None:
            self.metrics.bus_healthy.set(1 if value else 0)

    def _count(self, what: str, n: int = 1) -> None:
        if self.metrics is not None:
            getattr(self.metrics, f"bus_{what}").inc(n)

    async def _publish_loop(self, client: aioredis.Redis) -> None:
        pending = self._pending
        while True:
            if not pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            pipe = client.pipeline(transaction=False)
            n = 0
            while pending and n < MAX_BATCH:
                channel, envelope = pending.popleft()
                pipe.publish(channel, envelope)
                n += 1
            await pipe.execute()
            self._count("published", n)

    async def _heartbeat(self, client: aioredis.Redis) -> None:
        beat = msgpack.packb([self.node_id, "alive", 0])
        while True:
            await client.publish(NODES_CHANNEL, beat)
            now = time.monotonic()
            if now - self._last_echo > self.node_timeout:
                raise ConnectionError("redis stopped echoing our heartbeat")
            for node, seen in list(self._peers.items()):
                if now - seen > self.node_timeout:
                    self._node_down(node)
            await asyncio.sleep(self.heartbeat_seconds)

    def _node_down(self, node: str) -> None:
        self._peers.pop(node, None)
        for key in [k for k in self._seen if k[0] == node]:
            del self._seen[key]
        self._deliver(BusMessage(self.node_id, "", "_node-down", 0, node.encode()))

    async def _listen(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is None or message.get("type") != "message":
                continue
            channel = message["channel"]
            data = message["data"]
            if channel in (NODES_CHANNEL, NODES_CHANNEL.encode()):
                self._on_heartbeat(data)
            else:
                self._on_envelope(data)

    def _on_heartbeat(self, data: bytes) -> None:
        try:
            node, what, _ts = msgpack.unpackb(data)
        except Exception:  # noqa: BLE001 - not ours; ignore
            return
        now = time.monotonic()
        if node == self.node_id:
            self._last_echo = now
        elif what == "bye":
            self._node_down(node)
        else:
            self._peers[node] = now

    def _on_envelope(self, data: bytes) -> None:
        try:
            version, node, room, kind, seq, payload, target = msgpack.unpackb(data)
        except Exception:  # noqa: BLE001 - garbage on our channel; count and ignore
            self._count("malformed")
            return
        if version != ENVELOPE_VERSION or node == self.node_id:
            return
        self._count("received")
        self._peers[node] = time.monotonic()
        key = (node, room)
        last = self._seen.get(key)
        self._seen[key] = seq
        if last is not None and seq > last + 1:
            self._count("gaps")
            log.info("gap in peer sequence; re-syncing room", room=room, peer=node, missing=seq - last - 1)
            self._deliver(BusMessage(self.node_id, room, "_resync", 0, b""))
        if target is not None and target != self.node_id:
            return
        self._deliver(BusMessage(node, room, kind, seq, payload, target))
