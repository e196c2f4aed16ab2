"""Presence of one room: the room hands every awareness event here and this decides who hears what.

The room knows nothing about awareness rules; it calls ``on_join``/``on_leave``/``on_message``/
``on_query`` for its members, ``on_peer``/``on_node_down`` for the bus, and ``expire`` from the
janitor. Relays go out through the two callables given at construction: ``broadcast(frame,
exclude)`` to local members and ``publish(payload)`` to peer nodes (payloads carry each entry's
user so ownership holds across nodes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import msgpack

from collab import protocol
from collab.closecodes import BAD_MESSAGE
from collab.protocol import AwarenessEntry, ProtocolError
from presence.awareness import RoomAwareness


class Member(Protocol):
    identity: Any

    def send(self, frame: bytes) -> None: ...


def pack_awareness(pairs: list[tuple[AwarenessEntry, str]]) -> bytes:
    return msgpack.packb([[e.client_id, e.clock, e.state, user] for e, user in pairs])


def unpack_awareness(payload: bytes) -> list[tuple[AwarenessEntry, str]]:
    rows = msgpack.unpackb(payload)
    return [(AwarenessEntry(int(cid), int(clock), str(state)), str(user)) for cid, clock, state, user in rows]


class RoomPresence:
    def __init__(self, *, broadcast: Callable[[bytes, Member | None], None], publish: Callable[[bytes], None],
                 clock: Callable[[], float], max_client_ids: int = 8,
                 on_rejected: Callable[[int], None] | None = None) -> None:
        self.awareness = RoomAwareness()
        self._broadcast = broadcast
        self._publish = publish
        self._clock = clock
        self.max_client_ids = max_client_ids
        self._on_rejected = on_rejected

    # -- local members -------------------------------------------------------------------------

    def on_join(self, member: Member) -> None:
        entries = self.awareness.snapshot()
        if entries:
            member.send(protocol.encode_awareness(entries))

    def on_leave(self, member: Member) -> None:
        removed = self.awareness.remove_owner(member, self._clock())
        if removed:
            self._relay(removed, exclude=None, user=member.identity.user_id)

    def on_message(self, member: Member, entries: tuple[AwarenessEntry, ...]) -> None:
        user = member.identity.user_id
        result = self.awareness.apply(member, user, entries, self._clock(), max_ids=self.max_client_ids)
        if result.rejected and self._on_rejected is not None:
            self._on_rejected(result.rejected)
        if result.over_limit:
            raise ProtocolError("too many awareness client ids", BAD_MESSAGE)
        if result.changed:
            self._relay(result.changed, exclude=member, user=user)

    def on_query(self, member: Member) -> None:
        member.send(protocol.encode_awareness(self.awareness.snapshot()))

    def expire(self, timeout: float) -> None:
        removed = self.awareness.expire(self._clock(), timeout)
        if removed:
            self._relay(removed, exclude=None, user="")

    def _relay(self, entries: list[AwarenessEntry], exclude: Member | None, user: str) -> None:
        self._broadcast(protocol.encode_awareness(entries), exclude)
        self._publish(pack_awareness([(e, user) for e in entries]))

    # -- peer nodes ----------------------------------------------------------------------------

    def local_entries(self) -> bytes:
        """This node's own members' entries (not ones learnt from peers), packed for a peer."""
        pairs = self.awareness.owned_entries(lambda owner: not isinstance(owner, tuple))
        return pack_awareness(pairs) if pairs else b""

    def on_peer(self, node: str, payload: bytes) -> None:
        """Entries from another node: tracked with owner ("node", id), relayed to local members only."""
        owner = ("node", node)
        now = self._clock()
        changed: list[AwarenessEntry] = []
        for entry, user in unpack_awareness(payload):
            changed += self.awareness.apply(owner, user, (entry,), now).changed
        if changed:
            self._broadcast(protocol.encode_awareness(changed), None)

    def on_node_down(self, node: str) -> None:
        removed = self.awareness.remove_owner(("node", node), self._clock())
        if removed:
            self._broadcast(protocol.encode_awareness(removed), None)
