"""Presence: who is in a room, what they are pointing at. Depends only on collab.protocol types."""

from presence.awareness import ApplyResult, RoomAwareness
from presence.room import RoomPresence, pack_awareness, unpack_awareness

__all__ = ["ApplyResult", "RoomAwareness", "RoomPresence", "pack_awareness", "unpack_awareness"]
