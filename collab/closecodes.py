"""Every websocket close code the server uses, in one place.

Stock y-websocket clients stop reconnecting on 4400–4499, so that range is only for permanent
refusals. Transient conditions use codes that let the client come back.
"""

from typing import Final

NORMAL: Final = 1000
SERVER_RESTART: Final = 1012  # graceful drain (SIGTERM): reconnect to this or another node
TRY_AGAIN_LATER: Final = 1013  # slow consumer, overload, rate limit, room failed to load
INTERNAL_ERROR: Final = 1011

BAD_MESSAGE: Final = 4400  # malformed frame, invalid update, text frame, unknown type, bad room name
UNAUTHORIZED: Final = 4401  # token missing, invalid or expired
FORBIDDEN: Final = 4403  # token valid but does not allow this room
TOO_LARGE: Final = 4413  # frame or awareness state over its limit

DESCRIPTIONS: Final[dict[int, str]] = {
    NORMAL: "normal close",
    SERVER_RESTART: "server restarting or draining; reconnect",
    TRY_AGAIN_LATER: "slow consumer, overload, rate limit or room load failure; reconnect later",
    INTERNAL_ERROR: "internal error (details only in server logs)",
    BAD_MESSAGE: "malformed or invalid message; do not retry",
    UNAUTHORIZED: "missing, invalid or expired token",
    FORBIDDEN: "token does not allow this room",
    TOO_LARGE: "frame or state over the size limit",
}
