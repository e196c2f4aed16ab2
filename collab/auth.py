"""Identity and access: who is connecting, and may they open this room?

Identity comes from a signed token (HS256 JWT), never from the client's own claims: the user id,
display name and role stamped on everything a connection does are the token's. Without a secret
the server runs in open dev mode: everybody is an anonymous editor of every room (the name may
be chosen with ``?name=``, for demos and tests).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

import jwt

from collab.closecodes import FORBIDDEN, UNAUTHORIZED

Role = Literal["editor", "viewer"]
ROLES: tuple[Role, ...] = ("editor", "viewer")
ALGORITHM = "HS256"


class AccessDenied(Exception):
    def __init__(self, reason: str, code: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    name: str
    role: Role
    rooms: tuple[str, ...]
    expires_at: float | None = None

    @property
    def can_edit(self) -> bool:
        return self.role == "editor"

    def allows(self, room: str) -> bool:
        return any(fnmatchcase(room, pattern) for pattern in self.rooms)


def issue_token(secret: str, *, user: str, name: str | None = None, rooms: list[str] | tuple[str, ...] = ("*",),
                role: Role = "editor", ttl_seconds: float | None = 3600, now: float | None = None) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    issued = int(now if now is not None else time.time())
    claims: dict[str, object] = {"sub": user, "name": name or user, "rooms": list(rooms), "role": role, "iat": issued}
    if ttl_seconds is not None:
        claims["exp"] = issued + int(ttl_seconds)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str) -> Identity:
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["sub"]})
    except jwt.ExpiredSignatureError:
        raise AccessDenied("token expired", UNAUTHORIZED) from None
    except jwt.PyJWTError:
        raise AccessDenied("invalid token", UNAUTHORIZED) from None
    role = claims.get("role", "editor")
    rooms = claims.get("rooms", [])
    if role not in ROLES or not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
        raise AccessDenied("invalid token claims", UNAUTHORIZED)
    sub, name = claims["sub"], claims.get("name", claims["sub"])
    if not isinstance(sub, str) or not isinstance(name, str):
        raise AccessDenied("invalid token claims", UNAUTHORIZED)
    exp = claims.get("exp")
    return Identity(user_id=sub, name=name[:200], role=role, rooms=tuple(rooms),
                    expires_at=float(exp) if isinstance(exp, (int, float)) else None)


def token_from(conn: Any) -> tuple[str | None, str | None]:
    """The token a request or websocket carries (``?token=``, ``Authorization: Bearer``, or the
    sub-protocol ``bearer.<token>``), and that sub-protocol, which a websocket must echo when
    accepting. ``conn`` is a starlette ``Request`` or ``WebSocket``."""
    token = conn.query_params.get("token")
    if token:
        return token, None
    header = conn.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip(), None
    for proto in conn.scope.get("subprotocols", []) or []:
        if isinstance(proto, str) and proto.startswith("bearer."):
            return proto[7:], proto
    return None, None


def dev_identity(name: str | None, role: str | None = None) -> Identity:
    """Open dev mode: everyone may edit, so the only meaningful choice is to demote oneself to
    viewer (``?role=viewer``, used by dev-mode viewer invite links) — enforced like a token role."""
    display = (name or "").strip()[:200] or "Anonymous"
    user_id = f"dev:{display}" if name else f"anon:{uuid.uuid4().hex[:8]}"
    return Identity(user_id=user_id, name=display, role="viewer" if role == "viewer" else "editor", rooms=("*",))


def authenticate(secret: str | None, token: str | None, room: str, dev_name: str | None = None,
                 dev_role: str | None = None) -> Identity:
    """Return the identity for this connection or raise AccessDenied with its close code."""
    if secret is None:
        return dev_identity(dev_name, dev_role)
    if not token:
        raise AccessDenied("token required", UNAUTHORIZED)
    identity = verify_token(secret, token)
    if not identity.allows(room):
        raise AccessDenied("room not allowed", FORBIDDEN)
    return identity
