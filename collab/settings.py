"""Settings: read once (flags > environment ``COLLAB_*`` > defaults) into a frozen object.

Nothing reads the environment at import time; ``load_settings`` is called by the CLI and the
result is passed down. Every field is a documented, validated knob; limits say what they bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints


class SettingsError(ValueError):
    """A bad setting; the message is one line naming the setting."""


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = field(default="127.0.0.1", metadata={"help": "interface to listen on"})
    port: int = field(default=1234, metadata={"help": "TCP port"})
    store: str = field(
        default="collab-data/collab.db",
        metadata={"help": "SQLite path or sqlite:///… URL, or postgresql://… URL"},
    )
    secret: str | None = field(
        default=None,
        metadata={"help": "JWT signing secret (HS256); unset = open dev mode, anyone may edit"},
    )
    log_format: str = field(default="auto", metadata={"help": "json | console | auto (console on a tty)"})
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error"})
    redis: str | None = field(default=None, metadata={"help": "redis://… URL; unset = in-process bus"})
    node_id: str = field(default="", metadata={"help": "this node's id on the bus (default: random)"})

    # Limits (each bounds an attack or a resource; see README "Limits").
    max_frame_bytes: int = field(
        default=16 * 1024 * 1024, metadata={"help": "largest websocket message accepted (close 4413)"}
    )
    max_depth: int = field(default=64, metadata={"help": "deepest nesting in an update or awareness state"})
    max_connections: int = field(default=10_000, metadata={"help": "open sockets per node (close 1013 past it)"})
    outbox_max_bytes: int = field(
        default=32 * 1024 * 1024, metadata={"help": "bytes queued to one slow client before close 1013"}
    )
    outbox_max_frames: int = field(default=4096, metadata={"help": "frames queued to one client before close 1013"})
    rate_limit: float = field(default=300.0, metadata={"help": "messages per second per connection (sustained)"})
    rate_burst: int = field(default=3000, metadata={"help": "messages a connection may send in a burst"})
    max_inflight: int = field(default=1024, metadata={"help": "a connection's updates awaiting commit before its reads pause"})
    max_inflight_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata={"help": "bytes of a connection's updates awaiting commit before its reads pause (a bigger update passes alone)"},
    )
    max_awareness_entries: int = field(default=64, metadata={"help": "entries in one awareness message"})
    max_awareness_state_bytes: int = field(default=64 * 1024, metadata={"help": "size of one awareness state"})
    max_client_ids: int = field(default=8, metadata={"help": "awareness clientIDs one connection may own"})

    # Timing.
    keepalive_seconds: float = field(default=15.0, metadata={"help": "send a no-op frame after this much silence"})
    awareness_timeout_seconds: float = field(default=30.0, metadata={"help": "drop awareness not renewed for this long"})
    room_grace_seconds: float = field(default=10.0, metadata={"help": "keep an empty room loaded this long"})
    drain_seconds: float = field(default=10.0, metadata={"help": "graceful shutdown budget"})
    resync_seconds: float = field(default=30.0, metadata={"help": "anti-entropy: nodes compare state vectors this often"})
    node_timeout_seconds: float = field(default=5.0, metadata={"help": "a peer silent this long is dead; its presence is removed"})

    # Storage.
    compact_after_updates: int = field(default=500, metadata={"help": "fold a room's log into its snapshot past this many updates (each room at a random point from half of it, so rooms don't all compact at once)"})
    compact_after_bytes: int = field(default=1024 * 1024, metadata={"help": "…or past this many bytes"})
    compactions_at_once: int = field(default=1, metadata={"help": "compactions running at the same time, over all rooms"})
    sqlite_synchronous: str = field(default="FULL", metadata={"help": "FULL (power-loss safe) or NORMAL (crash safe)"})
    sqlite_writer: str = field(default="process", metadata={"help": "where SQLite group commits run: process (a child process: no GIL contention with the event loop) or thread"})
    commit_interval_ms: float = field(default=2.0, metadata={"help": "under load, start a storage commit at most this often (fewer, larger commits; 0 = commit as soon as possible)"})

    # Presence.
    presence_flush_ms: float = field(default=50.0, metadata={"help": "coalesce a room's awareness relay this long (0 = at once)"})
    presence_rate: float = field(default=30.0, metadata={"help": "awareness changes per second per connection (sustained)"})
    presence_burst: int = field(default=60, metadata={"help": "awareness changes a connection may make in a burst"})
    presence_idle_seconds: float = field(default=60.0, metadata={"help": "no edit or awareness change this long = idle"})
    presence_hidden_viewer_rooms: str = field(default="", metadata={"help": "room globs whose viewers do not share presence"})
    presence_sync_seconds: float = field(default=10.0, metadata={"help": "nodes re-announce their sessions this often"})
    presence_feed_max: int = field(default=1000, metadata={"help": "workspace presence feed subscribers per node"})
    presence_feed_queue: int = field(default=1000, metadata={"help": "events queued to a slow feed subscriber before close"})

    # Per-user undo.
    undo_capture_ms: int = field(default=500, metadata={"help": "a user's edits closer than this form one undo group"})
    undo_depth: int = field(default=100, metadata={"help": "undo (and redo) groups kept per user per room"})

    # Chat.
    chat_max_chars: int = field(default=4000, metadata={"help": "characters in one chat message"})
    chat_rate: float = field(default=1.0, metadata={"help": "chat writes per second per user (sustained)"})
    chat_burst: int = field(default=10, metadata={"help": "chat writes a user may make at once"})
    chat_history_on_join: int = field(default=50, metadata={"help": "chat messages pushed on join (0 = none)"})
    chat_max_page: int = field(default=200, metadata={"help": "largest chat history page"})

    # WebRTC signaling (/signaling) and ICE configuration (/api/rtc/config).
    stun_urls: str = field(default="", metadata={"help": "comma-separated stun: URLs handed to WebRTC peers"})
    turn_urls: str = field(default="", metadata={"help": "comma-separated turn:/turns: URLs"})
    turn_secret: str | None = field(default=None, metadata={"help": "TURN REST shared secret (coturn static-auth-secret)"})
    turn_ttl: int = field(default=86400, metadata={"help": "lifetime of generated TURN credentials, seconds"})
    signaling_max_topics: int = field(default=64, metadata={"help": "topics per signaling connection"})
    signaling_max_message_bytes: int = field(default=65536, metadata={"help": "largest signaling frame (close 4413)"})
    signaling_rate: float = field(default=50.0, metadata={"help": "signaling frames per second per connection"})
    signaling_burst: int = field(default=200, metadata={"help": "signaling frames allowed in a burst"})
    signaling_max_bad_frames: int = field(default=10, metadata={"help": "bad signaling frames answered before close 4400"})
    signaling_outbox_frames: int = field(default=1024, metadata={"help": "frames queued to a slow signaling reader before 1013"})
    signaling_outbox_bytes: int = field(default=4 * 1024 * 1024, metadata={"help": "bytes queued to a slow signaling reader before 1013"})

    ws_impl: str = field(default="websockets-sansio", metadata={"help": "uvicorn websocket implementation; websockets-sansio gets the room fast path (collab/wsfast.py)"})

    @property
    def dev_mode(self) -> bool:
        return self.secret is None

    def validate(self) -> Settings:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise SettingsError(message)

        check(1 <= self.port <= 65535, f"--port must be 1..65535, got {self.port}")
        check(bool(self.host), "--host must not be empty")
        check(bool(self.store), "--store must not be empty")
        check(self.log_format in ("json", "console", "auto"), f"--log-format must be json, console or auto, got {self.log_format!r}")
        check(self.log_level.lower() in ("debug", "info", "warning", "error"), f"--log-level must be debug, info, warning or error, got {self.log_level!r}")
        check(self.secret is None or len(self.secret) >= 16, "--secret must be at least 16 characters")
        check(self.redis is None or self.redis.startswith(("redis://", "rediss://", "unix://")), "--redis must be a redis:// URL")
        check(self.sqlite_synchronous.upper() in ("FULL", "NORMAL"), "--sqlite-synchronous must be FULL or NORMAL")
        check(self.sqlite_writer in ("process", "thread"), "--sqlite-writer must be process or thread")
        check(0 <= self.commit_interval_ms <= 1000, "--commit-interval-ms must be between 0 and 1000")
        check(self.ws_impl in ("websockets-sansio", "websockets", "wsproto"), "--ws-impl must be websockets-sansio, websockets or wsproto")
        check(1024 <= self.max_frame_bytes <= 1024**3, "--max-frame-bytes must be between 1 KiB and 1 GiB")
        check(self.outbox_max_bytes >= self.max_frame_bytes, "--outbox-max-bytes must be at least --max-frame-bytes")
        for name in ("max_depth", "max_connections", "outbox_max_frames", "rate_burst", "max_inflight", "max_inflight_bytes",
                     "max_awareness_entries", "max_awareness_state_bytes", "max_client_ids",
                     "compact_after_updates", "compact_after_bytes", "compactions_at_once", "turn_ttl", "signaling_max_topics",
                     "signaling_max_message_bytes", "signaling_burst", "signaling_max_bad_frames",
                     "signaling_outbox_frames", "signaling_outbox_bytes", "signaling_rate",
                     "chat_max_chars", "chat_rate", "chat_burst", "chat_max_page", "undo_capture_ms", "undo_depth",
                     "presence_rate", "presence_burst", "presence_idle_seconds", "presence_sync_seconds",
                     "presence_feed_max", "presence_feed_queue"):
            check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive")
        for name in ("rate_limit", "keepalive_seconds", "awareness_timeout_seconds", "drain_seconds",
                     "resync_seconds", "node_timeout_seconds"):
            check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive")
        for url in filter(None, (u.strip() for u in self.stun_urls.split(","))):
            check(url.startswith("stun:") or url.startswith("stuns:"), f"--stun-urls: not a stun: URL: {url!r}")
        for url in filter(None, (u.strip() for u in self.turn_urls.split(","))):
            check(url.startswith(("turn:", "turns:")), f"--turn-urls: not a turn: URL: {url!r}")
        check(self.presence_flush_ms >= 0, "--presence-flush-ms must not be negative")
        check(self.chat_history_on_join >= 0, "--chat-history-on-join must not be negative")
        check(self.room_grace_seconds >= 0, "--room-grace-seconds must not be negative")
        return self


def _coerce(name: str, kind: Any, raw: str) -> Any:
    try:
        if kind is int:
            return int(raw.replace("_", ""))
        if kind is float:
            return float(raw)
        return raw
    except ValueError:
        raise SettingsError(f"--{name.replace('_', '-')}: not a number: {raw!r}") from None


def _kinds() -> dict[str, Any]:
    hints = get_type_hints(Settings)
    kinds = {}
    for f in fields(Settings):
        hint = hints[f.name]
        kinds[f.name] = int if hint is int else float if hint is float else str
    return kinds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field, all defaulting to None so we can tell 'not given' apart."""
    for f in fields(Settings):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=f"{f.metadata.get('help', '')} (env COLLAB_{f.name.upper()}, default {f.default!r})",
        )


def load_settings(flags: Mapping[str, str | None], environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    kinds = _kinds()
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = flags.get(f.name)
        if raw is None:
            raw = environ.get(f"COLLAB_{f.name.upper()}")
        if raw is not None and raw != "":
            values[f.name] = _coerce(f.name, kinds[f.name], raw)
    settings = Settings(**values)
    if not settings.node_id:
        settings = dataclasses.replace(settings, node_id=uuid.uuid4().hex[:12])
    return settings.validate()
