"""Presence: who is in a room, what they are pointing at. Depends only on collab.protocol types."""

from presence.awareness import ApplyResult, RoomAwareness

__all__ = ["ApplyResult", "RoomAwareness"]
