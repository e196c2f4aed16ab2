"""Workspace presence: which users are in which rooms, across every node. Pure, no I/O.

Theory of operation
-------------------
* The unit is a *session* (one socket in one room), owned by the node that holds the socket.
  Each node publishes its own sessions' changes (up / down) on the cluster-wide presence channel
  and applies the others'; every node therefore holds the same registry, and answers workspace
  queries and feeds from memory, for rooms it does not even have loaded.
* Pub/sub loses messages, so each node also re-announces all its sessions every
  ``sync_seconds``; that *replaces* what others hold for it. A node's sessions disappear when it
  says goodbye, when the bus reports it dead (``_node-down``), or when it has been silent for
  three sync periods — a backstop for buses that cannot detect deaths.
* Feeds are about users, not sockets: a user with three tabs in a room joins once, leaves when
  the last tab closes, is idle only when every tab is idle. ``Registry`` computes those
  transitions by comparing the (room, user) view before and after each change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from presence.stamp import color_for

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class SessionRecord:
    sid: str  # "<node>/<connection>"
    node: str
    room: str
    user: str
    name: str
    role: str
    color: str
    connected_at: float  # wall clock, seconds since the epoch
    last_active: float  # wall clock
    idle: bool
    hidden: bool = False

    def to_wire(self) -> list[Any]:
        return [self.sid, self.room, self.user, self.name, self.role, self.color, round(self.connected_at, 3),
                round(self.last_active, 3), self.idle, self.hidden]

    @classmethod
    def from_wire(cls, node: str, row: list[Any]) -> SessionRecord:
        sid, room, user, name, role, color, connected_at, last_active, idle, hidden = row[:10]
        if not all(isinstance(v, str) for v in (sid, room, user, name, role, color)):
            raise ValueError("bad session record")
        if not sid.startswith(node + "/"):
            raise ValueError("session of another node")
        return cls(sid, node, room, user, name[:200], role, color[:16], float(connected_at), float(last_active),
                   bool(idle), bool(hidden))


@dataclass(frozen=True, slots=True)
class UserView:
    """One user in one room, summed over their sessions."""

    user: str
    name: str
    role: str
    color: str
    sessions: int
    idle: bool
    connected_at: float
    last_active: float

    def public(self) -> dict[str, Any]:
        return {"id": self.user, "name": self.name, "color": self.color, "role": self.role,
                "sessions": self.sessions, "idle": self.idle, "connected_at": round(self.connected_at, 3),
                "last_active": round(self.last_active, 3)}


def _same_but_times(a: SessionRecord, b: SessionRecord) -> bool:
    """Equal but for the clock-derived connected_at / last_active."""
    return (a.sid == b.sid and a.node == b.node and a.room == b.room and a.user == b.user and a.name == b.name
            and a.role == b.role and a.color == b.color and a.idle == b.idle and a.hidden == b.hidden)


def summarize(records: Iterable[SessionRecord]) -> dict[tuple[str, str], UserView]:
    grouped: dict[tuple[str, str], list[SessionRecord]] = {}
    for rec in records:
        if not rec.hidden:
            grouped.setdefault((rec.room, rec.user), []).append(rec)
    views = {}
    for key, recs in grouped.items():
        first = min(recs, key=lambda r: r.connected_at)
        views[key] = UserView(
            user=first.user, name=first.name,
            role="editor" if any(r.role == "editor" for r in recs) else first.role,
            color=first.color or color_for(first.user), sessions=len(recs), idle=all(r.idle for r in recs),
            connected_at=first.connected_at, last_active=max(r.last_active for r in recs))
    return views


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "join" | "leave" | "idle" | "active"
    room: str
    user: UserView

    def public(self, at: float) -> dict[str, Any]:
        return {"type": self.kind, "room": self.room, "user": self.user.public(), "at": round(at, 3)}


class Registry:
    def __init__(self) -> None:
        self.sessions: dict[str, SessionRecord] = {}
        self.by_node: dict[str, set[str]] = {}
        self.by_key: dict[tuple[str, str], set[str]] = {}  # (room, user) -> sids: changes stay O(affected)
        self.heard: dict[str, float] = {}  # node -> local clock when last heard from

    def __len__(self) -> int:
        return len(self.sessions)

    def _affected(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], UserView]:
        sessions, by_key = self.sessions, self.by_key
        return summarize(sessions[sid] for key in keys for sid in by_key.get(key, ()))

    def _diff(self, keys: set[tuple[str, str]], before: dict[tuple[str, str], UserView]) -> list[Event]:
        after = self._affected(keys)
        events = []
        for key in sorted(keys):
            old, new = before.get(key), after.get(key)
            if old is None and new is not None:
                events.append(Event("join", key[0], new))
                if new.idle:
                    events.append(Event("idle", key[0], new))
            elif old is not None and new is None:
                events.append(Event("leave", key[0], old))
            elif old is not None and new is not None and old.idle != new.idle:
                events.append(Event("idle" if new.idle else "active", key[0], new))
        return events

    def _change(self, upserts: Iterable[SessionRecord], removals: Iterable[str]) -> list[Event]:
        upserts = list(upserts)
        removals = [sid for sid in removals if sid in self.sessions]
        keys = {(r.room, r.user) for r in upserts}
        keys |= {(self.sessions[sid].room, self.sessions[sid].user) for sid in removals}
        for rec in upserts:
            old = self.sessions.get(rec.sid)
            if old is not None and (old.room, old.user) != (rec.room, rec.user):
                keys.add((old.room, old.user))
        before = self._affected(keys)
        for sid in removals:
            self._unindex(self.sessions.pop(sid))
        for rec in upserts:
            old = self.sessions.get(rec.sid)
            if old is not None:
                self._unindex(old)
            self.sessions[rec.sid] = rec
            self.by_node.setdefault(rec.node, set()).add(rec.sid)
            self.by_key.setdefault((rec.room, rec.user), set()).add(rec.sid)
        return self._diff(keys, before)

    def _unindex(self, rec: SessionRecord) -> None:
        _discard(self.by_node, rec.node, rec.sid)
        _discard(self.by_key, (rec.room, rec.user), rec.sid)

    def upsert(self, records: Iterable[SessionRecord]) -> list[Event]:
        return self._change(records, ())

    def remove(self, sids: Iterable[str]) -> list[Event]:
        return self._change((), sids)

    def replace_node(self, node: str, records: Iterable[SessionRecord]) -> list[Event]:
        """``node``'s complete list of sessions (its periodic re-announcement)."""
        records = [r for r in records if r.node == node]
        keep = {r.sid for r in records}
        stale = [sid for sid in self.by_node.get(node, ()) if sid not in keep]
        changed = []
        sessions = self.sessions
        for r in records:
            old = sessions.get(r.sid)
            if old == r:
                continue
            if old is not None and _same_but_times(old, r):
                # Only the clock-derived times moved (the wall clock is recomputed from the
                # monotonic one each time): nothing joined, left or went idle, nothing to diff.
                sessions[r.sid] = r
                continue
            changed.append(r)
        if not stale and not changed:
            return []
        return self._change(changed, stale)

    def drop_node(self, node: str) -> list[Event]:
        self.heard.pop(node, None)
        return self._change((), list(self.by_node.get(node, ())))

    def silent_nodes(self, now: float, horizon: float, me: str) -> list[str]:
        return [node for node, seen in self.heard.items() if node != me and now - seen > horizon]

    def rooms(self, prefix: str = "") -> dict[str, list[UserView]]:
        views = summarize(r for r in self.sessions.values() if r.room.startswith(prefix))
        rooms: dict[str, list[UserView]] = {}
        for (room, _user), view in sorted(views.items()):
            rooms.setdefault(room, []).append(view)
        return rooms

    def in_room(self, room: str) -> list[SessionRecord]:
        return [r for r in self.sessions.values() if r.room == room]


def _discard(index: dict[K, set[str]], key: K, sid: str) -> None:
    """Remove ``sid`` from ``index[key]``, and the key once its set is empty."""
    sids = index.get(key)
    if sids is not None:
        sids.discard(sid)
        if not sids:
            del index[key]
