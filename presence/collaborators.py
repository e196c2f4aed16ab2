"""The collaborators list of one room: users once each, their sessions, and resolved cursors.

Pure: given the room's sessions (this node's and other nodes'), its awareness and its document,
build the JSON the ``GET /api/rooms/<room>/presence`` endpoint returns. Sessions of hidden
viewers (room policy) are counted, not listed.
"""

from __future__ import annotations

import json
from typing import Any

import pycrdt

from presence.cursors import Resolver
from presence.registry import SessionRecord
from presence.room import RoomPresence
from presence.stamp import color_for, css_color


def remote_clients(presence: RoomPresence) -> dict[str, list[int]]:
    """clientIDs learnt from peers, by their session id ("<node>/<connection>")."""
    out: dict[str, list[int]] = {}
    for cid, known in presence.entries():
        if known.session and isinstance(known.owner, tuple):
            out.setdefault(known.session, []).append(cid)
    return out


def collaborators(room: str, sessions: list[tuple[SessionRecord, list[int]]], presence: RoomPresence | None,
                  doc: pycrdt.Doc | None, idle_seconds: float) -> dict[str, Any]:
    resolver = Resolver.of(doc) if doc is not None else None
    users: dict[str, dict[str, Any]] = {}
    hidden = 0
    for rec, cids in sorted(sessions, key=lambda item: item[0].connected_at):
        if rec.hidden:
            hidden += 1
            continue
        clients = []
        color = None
        for cid in sorted(cids):
            known = presence.awareness.get(cid) if presence is not None else None
            state = _parse(known.state) if known is not None else None
            color = color or _user_color(state)
            cursor = resolver.cursor(state) if resolver is not None and state is not None else None
            clients.append({"client_id": cid, "cursor": cursor})
        connected_at, last_active = round(rec.connected_at, 3), round(rec.last_active, 3)
        user = users.get(rec.user)
        if user is None:
            user = users[rec.user] = {
                "id": rec.user, "name": rec.name, "color": color or rec.color or color_for(rec.user),
                "role": rec.role, "read_only": rec.role != "editor", "connected_at": connected_at,
                "last_active": last_active, "idle": rec.idle, "sessions": []}
        elif color and user["color"] == color_for(rec.user):
            user["color"] = color
        if rec.role == "editor":
            user["role"], user["read_only"] = "editor", False
        user["last_active"] = max(user["last_active"], last_active)
        user["idle"] = user["idle"] and rec.idle
        user["sessions"].append({"id": rec.sid, "node": rec.node, "role": rec.role, "connected_at": connected_at,
                                 "last_active": last_active, "idle": rec.idle, "clients": clients})
    return {"room": room, "idle_seconds": idle_seconds, "users": list(users.values()), "hidden_viewers": hidden}


def _parse(state: str) -> Any:
    try:
        return json.loads(state)
    except ValueError:
        return None


def _user_color(state: Any) -> str | None:
    if isinstance(state, dict) and isinstance(state.get("user"), dict):
        return css_color(state["user"].get("color"))
    return None
