"""Presence: who is in a room, what they are pointing at, and who is where across the workspace.

The pure parts (awareness rules, stamping, cursors, the registry, one room's presence) depend only
on ``collab.protocol`` types. ``PresenceService`` is the shell that plugs them into the hub
(routes, bus channel, feeds); it is imported lazily so that ``collab.room`` can import this
package without pulling in the web framework.
"""

from typing import Any

from presence.awareness import ApplyResult, RoomAwareness
from presence.config import PresenceSettings
from presence.room import RoomPresence, pack_awareness, unpack_awareness

__all__ = ["ApplyResult", "PresenceService", "PresenceSettings", "RoomAwareness", "RoomPresence",
           "pack_awareness", "unpack_awareness"]


def __getattr__(name: str) -> Any:
    if name == "PresenceService":
        from presence.service import PresenceService

        return PresenceService
    raise AttributeError(name)
