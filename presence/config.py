"""Presence settings, read by name from the server's settings object.

The lead owns ``collab.settings.Settings``; presence reads its knobs with ``getattr(settings,
name, default)`` so it works before and after those fields exist. Each limit says what it bounds.

===============================  =======  ==========================================================
field                            default  meaning
===============================  =======  ==========================================================
``presence_flush_ms``            50       awareness relay is coalesced per room for this long: one
                                          frame per member per window carrying the latest entry of
                                          every client that changed (0 = relay each message at once)
``presence_rate``                30.0     awareness changes per second per connection, sustained;
                                          past it intermediate states are dropped (counted) and the
                                          latest one is relayed when the bucket refills
``presence_burst``               60       awareness changes a connection may make in a burst
``presence_idle_seconds``        60.0     a session with no edit and no awareness change for this
                                          long is idle (collaborators list, workspace feed)
``presence_hidden_viewer_rooms`` ""       comma-separated room globs whose viewers do not share
                                          presence (their awareness is dropped, they are not
                                          listed); elsewhere viewers share it, marked read-only
``presence_sync_seconds``        10.0     each node re-announces its sessions to the cluster this
                                          often; a node silent for 3x this long is dropped
``presence_feed_max``            1000     workspace feed subscribers (websocket + SSE) per node
``presence_feed_queue``          1000     events queued to one slow feed subscriber before it is
                                          closed (1013 / end of stream)
===============================  =======  ==========================================================

Also read: ``max_awareness_entries`` (outgoing awareness frames are split so no client ever
receives more entries per frame than the server accepts back — clients echo what they apply),
``awareness_timeout_seconds``, ``secret``, ``node_id``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from fnmatch import fnmatchcase
from typing import Any


@dataclass(frozen=True, slots=True)
class PresenceSettings:
    flush_ms: float = 50.0
    rate: float = 30.0
    burst: int = 60
    idle_seconds: float = 60.0
    hidden_viewer_rooms: tuple[str, ...] = ()
    sync_seconds: float = 10.0
    feed_max: int = 1000
    feed_queue: int = 1000
    max_entries_per_frame: int = 64
    awareness_timeout_seconds: float = 30.0
    secret: str | None = None
    node_id: str = ""

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> PresenceSettings:
        d = cls()
        values: dict[str, Any] = {
            "flush_ms": float(getattr(settings, "presence_flush_ms", d.flush_ms)),
            "rate": float(getattr(settings, "presence_rate", d.rate)),
            "burst": int(getattr(settings, "presence_burst", d.burst)),
            "idle_seconds": float(getattr(settings, "presence_idle_seconds", d.idle_seconds)),
            "hidden_viewer_rooms": _globs(getattr(settings, "presence_hidden_viewer_rooms", "")),
            "sync_seconds": float(getattr(settings, "presence_sync_seconds", d.sync_seconds)),
            "feed_max": int(getattr(settings, "presence_feed_max", d.feed_max)),
            "feed_queue": int(getattr(settings, "presence_feed_queue", d.feed_queue)),
            "max_entries_per_frame": int(getattr(settings, "max_awareness_entries", d.max_entries_per_frame)),
            "awareness_timeout_seconds": float(getattr(settings, "awareness_timeout_seconds",
                                                       d.awareness_timeout_seconds)),
            "secret": getattr(settings, "secret", None),
            "node_id": str(getattr(settings, "node_id", "") or ""),
        }
        values.update(overrides)
        return cls(**values).validate()

    def validate(self) -> PresenceSettings:
        problems = []
        if self.flush_ms < 0:
            problems.append("presence_flush_ms must not be negative")
        for name in ("rate", "idle_seconds", "sync_seconds", "awareness_timeout_seconds"):
            if getattr(self, name) <= 0:
                problems.append(f"presence_{name} must be positive")
        for name in ("burst", "feed_max", "feed_queue", "max_entries_per_frame"):
            if getattr(self, name) < 1:
                problems.append(f"presence_{name} must be at least 1")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def viewers_hidden(self, room: str) -> bool:
        return any(fnmatchcase(room, pattern) for pattern in self.hidden_viewer_rooms)

    def replace(self, **changes: Any) -> PresenceSettings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return PresenceSettings(**values).validate()


def _globs(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(item.strip() for item in items if isinstance(item, str) and item.strip())
