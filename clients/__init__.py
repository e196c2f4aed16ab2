"""First-party clients: the Python client SDK (editor plugins, tests, benchmarks), the low-level
y-websocket client, and the browser app."""

from clients.sdk import (
    BadMessage,
    CollabClient,
    CollabError,
    ConnectionLost,
    Forbidden,
    Presence,
    PresenceChange,
    RequestFailed,
    Room,
    ServerClosed,
    TooLarge,
    Unauthorized,
    UndoState,
)
from clients.yclient import ClosedError, YClient, room_url

__all__ = [
    "BadMessage", "ClosedError", "CollabClient", "CollabError", "ConnectionLost", "Forbidden", "Presence",
    "PresenceChange", "RequestFailed", "Room", "ServerClosed", "TooLarge", "Unauthorized", "UndoState",
    "YClient", "room_url",
]
