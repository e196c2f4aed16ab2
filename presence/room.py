"""Presence of one room: the room hands every awareness event here and this decides who hears what.

The room knows nothing about awareness rules; it calls ``on_join``/``on_leave``/``on_message``/
``on_query`` for its members, ``on_peer``/``on_node_down`` for the bus, and ``expire`` from the
janitor. Relays go out through the two callables given at construction: ``broadcast(frame,
exclude)`` to local members and ``publish(payload)`` to peer nodes.

Theory of operation
-------------------
* Identity: a member's state is stored and relayed *stamped* (``presence.stamp``): ``user`` is the
  connection's authenticated identity. Ownership of clientIDs is ``presence.awareness``'s.
* Coalescing: changed entries are collected for ``flush_ms`` and then sent as one awareness
  message per member holding the latest entry of every changed client — a room of N clients all
  moving their cursors costs N frames per window, not N². Frames are shared bytes; the member
  whose entries are the only ones in a batch does not get it back, the others ignore their own
  entry (equal clock) as y-protocols prescribes. A batch larger than ``max_entries_per_frame`` is
  split, because clients echo what they apply and the server refuses bigger messages.
  Removals (leave, expiry, node death) flush at once. Peers get the same batch as one bus message.
* Rate limit: each connection's changes pass a token bucket. Over it, intermediate states are
  dropped (counted) and the newest state of each clientID it holds is kept and relayed when the
  bucket refills — the last cursor position is never lost, and what is kept is bounded by
  ``max_client_ids``. Echoes cost nothing: they are stale and never reach the bucket.
* Timers: one ``call_later`` handle per room, armed only while there is something to send and a
  member to send it to; the last member's leave flushes and disarms it. No timer outlives its room.
* Sessions: one per local member (connected since, last active, idle), for the collaborators list
  and the workspace feed. Activity is an awareness change (a renewal with the same state is not)
  or a document edit (``touch_user``).
* Peers: rows ``[clientID, clock, state, user, session]``; readers accept four or more fields so
  the format can grow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from collab import protocol
from collab.closecodes import BAD_MESSAGE
from collab.protocol import AwarenessEntry, ProtocolError
from collab.ratelimit import TokenBucket
from presence.awareness import NULL, Known, RoomAwareness, Verdict
from presence.config import PresenceSettings
from presence.stamp import InvalidState, color_for, stamp_state


class Member(Protocol):
    id: str
    identity: Any
    connected_at: float

    def send(self, frame: bytes) -> None: ...


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _Nothing:
    def inc(self, amount: float = 1) -> None:
        pass


@dataclass(slots=True)
class PresenceStats:
    """Counters RoomPresence feeds; the presence service hands in Prometheus ones."""

    changes: _Counter = field(default_factory=_Nothing)  # awareness changes accepted from local members
    frames: _Counter = field(default_factory=_Nothing)  # awareness frames queued to clients
    entries: _Counter = field(default_factory=_Nothing)  # entries delivered (entries x recipients)
    flushes: _Counter = field(default_factory=_Nothing)  # coalesced relays
    throttled: _Counter = field(default_factory=_Nothing)  # changes dropped by the per-connection rate limit
    refused: _Counter = field(default_factory=_Nothing)  # states not relayed: not a JSON object, NaN, hidden viewer


@dataclass(slots=True)
class Session:
    member: Member
    connected_at: float
    last_active: float
    bucket: TokenBucket
    hidden: bool = False  # a viewer in a room whose policy hides viewers
    idle: bool = False  # as last reported (``idle_changes``)
    color: str | None = None  # the colour in its latest stamped state


Row = tuple[AwarenessEntry, str, str]  # entry, user id, session id


def pack_awareness(rows: list[Row] | list[tuple[AwarenessEntry, str]]) -> bytes:
    out = []
    for row in rows:
        entry, user = row[0], row[1]
        session = row[2] if len(row) > 2 else ""  # type: ignore[misc]
        out.append([entry.client_id, entry.clock, entry.state, user, session])
    return msgpack.packb(out)


def unpack_awareness(payload: bytes) -> list[Row]:
    rows = msgpack.unpackb(payload)
    out = []
    for row in rows:
        cid, clock, state, user = row[:4]
        session = row[4] if len(row) > 4 else ""
        out.append((AwarenessEntry(int(cid), int(clock), str(state)), str(user), str(session)))
    return out


class RoomPresence:
    def __init__(self, *, broadcast: Callable[[bytes, Member | None], None], publish: Callable[[bytes], None],
                 clock: Callable[[], float], max_client_ids: int = 8,
                 on_rejected: Callable[[int], None] | None = None,
                 settings: PresenceSettings | None = None, room: str = "") -> None:
        self.awareness = RoomAwareness()
        self.sessions: dict[Member, Session] = {}
        self._by_user: dict[str, list[Session]] = {}  # touch_user runs once per update: no scan
        self._broadcast = broadcast
        self._publish = publish
        self._clock = clock
        self.max_client_ids = max_client_ids
        self._on_rejected = on_rejected
        self.settings = settings or PresenceSettings()
        self.room = room
        self.stats = PresenceStats()
        self.on_change: Callable[[Session], None] | None = None  # became active, or changed colour
        self.configured_by: object | None = None
        self._to_members: dict[int, tuple[AwarenessEntry, Hashable | None]] = {}
        self._to_peers: dict[int, Row] = {}
        self._deferred: dict[int, tuple[Member, AwarenessEntry]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0

    def configure(self, settings: PresenceSettings, *, room: str, stats: PresenceStats | None = None,
                  on_change: Callable[[Session], None] | None = None, by: object | None = None) -> None:
        """Called by the presence service the first time it sees this room."""
        self.settings = settings
        self.room = room
        self.stats = stats or PresenceStats()
        self.on_change = on_change
        self.configured_by = by
        hidden = settings.viewers_hidden(room)
        now = self._clock()
        for session in self.sessions.values():
            session.hidden = hidden and not session.member.identity.can_edit
            session.bucket = TokenBucket(settings.rate, settings.burst, now)

    # -- local members -------------------------------------------------------------------------

    def on_join(self, member: Member) -> None:
        now = self._clock()
        s = self.settings
        hidden = s.viewers_hidden(self.room) and not member.identity.can_edit
        session = Session(member, getattr(member, "connected_at", now), now, TokenBucket(s.rate, s.burst, now), hidden)
        old = self.sessions.get(member)
        if old is not None:
            self._unindex(old)
        self.sessions[member] = session
        self._by_user.setdefault(member.identity.user_id, []).append(session)
        self._send_snapshot(member)

    def _unindex(self, session: Session) -> None:
        user = session.member.identity.user_id
        same = self._by_user.get(user)
        if same is not None:
            same[:] = [other for other in same if other is not session]
            if not same:
                del self._by_user[user]

    def on_leave(self, member: Member) -> None:
        session = self.sessions.pop(member, None)
        if session is not None:
            self._unindex(session)
        for cid in [cid for cid, (owner, _) in self._deferred.items() if owner is member]:
            del self._deferred[cid]
        removed = self.awareness.remove_owner(member, self._clock())
        user = member.identity.user_id
        for entry in removed:
            self._queue(entry, None, (entry, user, member.id))
        self.flush()

    def on_query(self, member: Member) -> None:
        self._send_snapshot(member)

    def on_message(self, member: Member, entries: tuple[AwarenessEntry, ...]) -> None:
        session = self.sessions.get(member)
        if session is None:
            self.on_join(member)
            session = self.sessions[member]
        now = self._clock()
        user = member.identity.user_id
        rejected = 0
        over_limit = urgent = False
        for entry in entries:
            verdict = self.awareness.check(member, user, entry)
            if verdict is Verdict.STALE:
                continue
            if verdict is Verdict.FOREIGN:
                rejected += 1
                continue
            if verdict is Verdict.REMOVE:
                self._deferred.pop(entry.client_id, None)
                removed = self.awareness.remove(entry.client_id, entry.clock, now)
                if removed is not None:
                    self._queue(removed, member, (removed, user, member.id))
                    urgent = True
                continue
            if session.hidden:
                self.stats.refused.inc()
                continue
            if verdict is Verdict.NEW_ID and self.awareness.holds(member) >= self.max_client_ids:
                over_limit = True
                continue
            if not session.bucket.take(now):
                if verdict is Verdict.UPDATE:  # at most one per clientID held: bounded by max_client_ids
                    self._deferred[entry.client_id] = (member, entry)
                self.stats.throttled.inc()
                continue
            self._deferred.pop(entry.client_id, None)
            self._accept(session, entry, now)
        if rejected and self._on_rejected is not None:
            self._on_rejected(rejected)
        if urgent or self.settings.flush_ms <= 0:
            self.flush()
        else:
            self._arm()
        if over_limit:
            raise ProtocolError("too many awareness client ids", BAD_MESSAGE)

    def _accept(self, session: Session, entry: AwarenessEntry, now: float) -> None:
        member = session.member
        ident = member.identity
        try:
            stamped, value = stamp_state(entry.state, ident.user_id, ident.name, ident.role)
        except InvalidState:
            self.stats.refused.inc()
            return
        color = value["user"]["color"]
        recolored = color != (session.color or color_for(ident.user_id))
        session.color = color
        known = self.awareness.get(entry.client_id)
        if known is None or known.state != stamped:
            self._activity(session, now, recolored)  # a renewal with the same state is not activity
        stamped_entry = AwarenessEntry(entry.client_id, entry.clock, stamped)
        self.awareness.put(member, ident.user_id, stamped_entry, now, session=member.id)
        self.stats.changes.inc()
        self._queue(stamped_entry, member, (stamped_entry, ident.user_id, member.id))

    def _activity(self, session: Session, now: float, changed: bool = False) -> None:
        session.last_active = now
        if session.idle:
            session.idle = False
            changed = True
        if changed and self.on_change is not None:
            self.on_change(session)

    def touch_user(self, user_id: str) -> None:
        """A document change by ``user_id`` in this room: their sessions here are active."""
        sessions = self._by_user.get(user_id)
        if sessions:
            now = self._clock()
            for session in sessions:
                session.last_active = now
                if session.idle:  # rare: only then is there anything to tell (``_activity``)
                    self._activity(session, now)

    def idle_changes(self, idle_seconds: float) -> list[Session]:
        """Sessions whose idle flag flipped since the last call (the flag is updated)."""
        now = self._clock()
        flipped = []
        for session in self.sessions.values():
            idle = now - session.last_active >= idle_seconds
            if idle != session.idle:
                session.idle = idle
                flipped.append(session)
        return flipped

    def expire(self, timeout: float) -> None:
        now = self._clock()
        for entry in self.awareness.expire(now, timeout):
            self._queue(entry, None, (entry, "", ""))
        if self._to_members or self._to_peers:
            self.flush()

    # -- relaying ------------------------------------------------------------------------------

    def _queue(self, entry: AwarenessEntry, owner: Hashable | None, peer_row: Row | None) -> None:
        if self.sessions:
            self._to_members[entry.client_id] = (entry, owner)
        if peer_row is not None:
            self._to_peers[entry.client_id] = peer_row

    def _arm(self, delay: float | None = None) -> None:
        if not self._to_members and not self._to_peers and not self._deferred:
            return
        if delay is None:
            delay = self.settings.flush_ms / 1000.0
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if self._timer is not None:
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = loop.call_later(delay, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._deferred:
            self._retry_deferred()
        if self._to_members:
            batch, self._to_members = self._to_members, {}
            if self.sessions:
                self._send_batch(batch)
        if self._to_peers:
            rows, self._to_peers = list(self._to_peers.values()), {}
            self._publish(pack_awareness(rows))
        if self._deferred:
            if not self.sessions:
                self._deferred.clear()
            else:
                self._arm(max(1.0 / self.settings.rate, 0.005))

    def _retry_deferred(self) -> None:
        now = self._clock()
        for cid, (member, entry) in list(self._deferred.items()):
            session = self.sessions.get(member)
            if session is None:
                del self._deferred[cid]
                continue
            if self.awareness.check(member, member.identity.user_id, entry) is not Verdict.UPDATE:
                del self._deferred[cid]
                continue
            if session.bucket.take(now):
                del self._deferred[cid]
                self._accept(session, entry, now)

    def _send_batch(self, batch: dict[int, tuple[AwarenessEntry, Hashable | None]]) -> None:
        entries = []
        owners = set()
        for entry, owner in batch.values():
            entries.append(entry)
            owners.add(owner)
        sole = next(iter(owners)) if len(owners) == 1 else None
        exclude = sole if sole in self.sessions else None
        recipients = len(self.sessions) - (1 if exclude is not None else 0)
        if recipients <= 0:
            return
        frames = self._frames(entries)
        for frame in frames:
            self._broadcast(frame, exclude)  # type: ignore[arg-type]
        self.stats.flushes.inc()
        self.stats.frames.inc(len(frames) * recipients)
        self.stats.entries.inc(len(entries) * recipients)

    def _frames(self, entries: list[AwarenessEntry]) -> list[bytes]:
        size = self.settings.max_entries_per_frame
        return [protocol.encode_awareness(entries[i:i + size]) for i in range(0, len(entries), size)]

    def _send_snapshot(self, member: Member) -> None:
        entries = self.awareness.snapshot()
        if not entries:
            return
        frames = self._frames(entries)
        for frame in frames:
            member.send(frame)
        self.stats.frames.inc(len(frames))
        self.stats.entries.inc(len(entries))

    # -- peer nodes ----------------------------------------------------------------------------

    def local_entries(self) -> bytes:
        """This node's own members' entries (not ones learnt from peers), packed for a peer."""
        pairs = self.awareness.owned_entries(lambda owner: not isinstance(owner, tuple))
        return pack_awareness([(e, k.user, k.session) for e, k in pairs]) if pairs else b""

    def on_peer(self, node: str, payload: bytes) -> None:
        """Entries from another node: tracked with owner ("node", id), relayed to local members only."""
        owner = ("node", node)
        now = self._clock()
        urgent = False
        for entry, user, session in unpack_awareness(payload):
            sid = f"{node}/{session}" if session else ""
            for changed in self.awareness.apply(owner, user, (entry,), now, session=sid).changed:
                self._queue(changed, owner, None)
                urgent = urgent or changed.state == NULL
        if urgent or self.settings.flush_ms <= 0:
            self.flush()
        else:
            self._arm()

    def on_node_down(self, node: str) -> None:
        for entry in self.awareness.remove_owner(("node", node), self._clock()):
            self._queue(entry, None, None)
        self.flush()

    # -- reading -------------------------------------------------------------------------------

    def entries(self) -> list[tuple[int, Known]]:
        return list(self.awareness.items())
