"""The bus between server nodes. Nodes are peers; the bus only fans out, it never stores.

A ``BusMessage`` carries the sending node, the room, what kind of thing it is, a per-(node, room)
sequence number (so receivers can detect gaps: Redis pub/sub is at-most-once) and an opaque
payload. The in-process ``LocalBus`` connects the hubs living in one process (the embedded
default has exactly one, so publishing costs nothing); the Redis bus lives in ``collab.redisbus``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class BusMessage:
    node: str
    room: str
    kind: str  # "update" | "awareness" | "sync-request" | "sync-reply" | …
    seq: int
    payload: bytes
    target: str | None = None  # a node id for directed replies, else None = everyone


Handler = Callable[[BusMessage], None]


class Bus(Protocol):
    node_id: str

    async def start(self) -> None: ...
    async def run(self) -> None: ...
    async def stop(self) -> None: ...
    async def subscribe(self, room: str) -> None: ...
    async def unsubscribe(self, room: str) -> None: ...
    def publish(self, room: str, kind: str, payload: bytes, target: str | None = None) -> None: ...
    @property
    def healthy(self) -> bool: ...


class LocalNetwork:
    """Connects LocalBus instances in one process (tests run several hubs on it)."""

    def __init__(self) -> None:
        self.subscribers: dict[str, set[LocalBus]] = defaultdict(set)


class LocalBus:
    def __init__(self, node_id: str, deliver: Handler, network: LocalNetwork | None = None) -> None:
        self.node_id = node_id
        self._deliver = deliver
        self._network = network or LocalNetwork()
        self._seq: dict[str, int] = defaultdict(int)

    @property
    def healthy(self) -> bool:
        return True

    async def start(self) -> None:
        pass

    async def run(self) -> None:
        pass

    async def stop(self) -> None:
        for subs in self._network.subscribers.values():
            subs.discard(self)

    async def subscribe(self, room: str) -> None:
        self._network.subscribers[room].add(self)

    async def unsubscribe(self, room: str) -> None:
        subs = self._network.subscribers.get(room)
        if subs is not None:
            subs.discard(self)
            if not subs:
                del self._network.subscribers[room]

    def publish(self, room: str, kind: str, payload: bytes, target: str | None = None) -> None:
        subs = self._network.subscribers.get(room)
        if not subs or (len(subs) == 1 and self in subs):
            return
        self._seq[room] += 1
        message = BusMessage(self.node_id, room, kind, self._seq[room], payload, target)
        for bus in list(subs):
            if bus is not self and (target is None or target == bus.node_id):
                bus._deliver(message)
