"""Signaling settings and ICE/TURN configuration.

The lead owns ``collab.settings.Settings``; this module reads the signaling knobs from it by
name (``getattr(settings, name, default)``), so the service works before and after those fields
exist. Every limit is documented here, where it is defined:

=================================  ======  ==============================================================
field                              default what it bounds
=================================  ======  ==============================================================
``signaling_max_topics``           64      topics one connection may be subscribed to at once; past it the
                                           extra topic gets ``{"type":"error","topic":T,"message":"too many topics"}``
                                           (a subscribe frame listing more than this is a bad frame)
``signaling_max_message_bytes``    65536   size of one signaling frame (UTF-8 bytes); past it: close 4413
``signaling_rate``                 50.0    frames per second per connection, sustained (token bucket)
``signaling_burst``                200     frames a connection may send in a burst (a joiner trickling ICE
                                           candidates to many peers at once)
``signaling_max_bad_frames``       10      non-JSON / wrongly shaped frames per connection, each answered
                                           with an error; one more closes with 4400
``signaling_outbox_frames``        1024    frames queued to one slow reader before close 1013
``signaling_outbox_bytes``         4 MiB   characters queued to one slow reader before close 1013
``signaling_max_connections``      10000   signaling sockets per node (refused with 1013 past it)
``stun_urls``                      ""      comma-separated ``stun:`` URLs handed out by /api/rtc/config
``turn_urls``                      ""      comma-separated ``turn:``/``turns:`` URLs
``turn_secret``                    None    shared secret with the TURN server (coturn ``static-auth-secret``);
                                           unset = TURN URLs are returned without credentials
``turn_ttl``                       86400   lifetime (seconds) of generated TURN credentials
=================================  ======  ==============================================================

Rate limit: the first frame over the bucket is answered with ``{"type":"error","message":"rate limit
exceeded"}`` and dropped; frames keep being dropped until the bucket refills; if more than one
second's worth (``signaling_rate`` frames, at least 10) are dropped in one episode, close 1013.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any

DEFAULT_TURN_TTL = 86_400  # the TURN REST draft's recommended credential lifetime


def _urls(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        items = value.replace(";", ",").split(",")
    else:
        items = list(value)
    return tuple(item.strip() for item in items if isinstance(item, str) and item.strip())


@dataclass(frozen=True, slots=True)
class SignalingSettings:
    max_topics: int = 64
    max_message_bytes: int = 64 * 1024
    rate: float = 50.0
    burst: int = 200
    max_bad_frames: int = 10
    outbox_frames: int = 1024
    outbox_bytes: int = 4 * 1024 * 1024
    max_connections: int = 10_000
    stun_urls: tuple[str, ...] = ()
    turn_urls: tuple[str, ...] = ()
    turn_secret: str | None = None
    turn_ttl: int = DEFAULT_TURN_TTL
    secret: str | None = None  # the server's JWT secret (None = open dev mode)
    # Cluster gossip of per-node subscriber counts (for the ``clients`` field).
    gossip_seconds: float = 10.0

    @classmethod
    def from_settings(cls, settings: Any) -> SignalingSettings:
        def get(name: str, default: Any) -> Any:
            value = getattr(settings, name, None)
            return default if value is None or value == "" else value

        d = cls()
        result = cls(
            max_topics=int(get("signaling_max_topics", d.max_topics)),
            max_message_bytes=int(get("signaling_max_message_bytes", d.max_message_bytes)),
            rate=float(get("signaling_rate", d.rate)),
            burst=int(get("signaling_burst", d.burst)),
            max_bad_frames=int(get("signaling_max_bad_frames", d.max_bad_frames)),
            outbox_frames=int(get("signaling_outbox_frames", d.outbox_frames)),
            outbox_bytes=int(get("signaling_outbox_bytes", d.outbox_bytes)),
            max_connections=int(get("signaling_max_connections", get("max_connections", d.max_connections))),
            stun_urls=_urls(get("stun_urls", ())),
            turn_urls=_urls(get("turn_urls", ())),
            turn_secret=get("turn_secret", None),
            turn_ttl=int(get("turn_ttl", d.turn_ttl)),
            secret=get("secret", None),
        )
        return result.validate()

    def validate(self) -> SignalingSettings:
        for name in ("max_topics", "max_message_bytes", "burst", "max_bad_frames", "outbox_frames", "outbox_bytes",
                     "max_connections", "turn_ttl"):
            if getattr(self, name) <= 0:
                raise ValueError(f"signaling setting {name} must be positive")
        if self.rate <= 0:
            raise ValueError("signaling setting rate must be positive")
        for url in self.stun_urls:
            if not url.startswith(("stun:", "stuns:")):
                raise ValueError(f"--stun-urls: not a stun: URL: {url!r}")
        for url in self.turn_urls:
            if not url.startswith(("turn:", "turns:")):
                raise ValueError(f"--turn-urls: not a turn:/turns: URL: {url!r}")
        return self


def turn_credentials(secret: str, user: str, ttl: int, now: float | None = None) -> tuple[str, str, int]:
    """TURN REST API credentials (draft-uberti-behave-turn-rest, coturn ``use-auth-secret``).

    username = ``<expiry unix time>:<user>``, credential = base64(HMAC-SHA1(secret, username)).
    Returns (username, credential, expiry).
    """
    expiry = int(now if now is not None else time.time()) + int(ttl)
    safe_user = user.replace(":", "_")[:128]
    username = f"{expiry}:{safe_user}"
    digest = hmac.new(secret.encode("utf-8"), username.encode("utf-8"), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii"), expiry


def ice_config(cfg: SignalingSettings, user: str, now: float | None = None) -> dict[str, Any]:
    """The body of ``GET /api/rtc/config``: ``RTCConfiguration``-shaped ``iceServers`` plus expiry."""
    now = time.time() if now is None else now
    servers: list[dict[str, Any]] = []
    body: dict[str, Any] = {"iceServers": servers}
    if cfg.stun_urls:
        servers.append({"urls": list(cfg.stun_urls)})
    if cfg.turn_urls:
        entry: dict[str, Any] = {"urls": list(cfg.turn_urls)}
        if cfg.turn_secret:
            username, credential, expiry = turn_credentials(cfg.turn_secret, user, cfg.turn_ttl, now)
            entry.update(username=username, credential=credential)
            body["ttl"] = cfg.turn_ttl
            body["expiresAt"] = expiry
        servers.append(entry)
    return body
