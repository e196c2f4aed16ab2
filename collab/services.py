"""Features that ride alongside documents (undo, chat, presence feeds, signaling…) plug in here.

A service is registered with the hub at start. It may handle extension messages arriving on
the document socket (``message_types``), bus messages of its own kinds (``bus_kinds``), see
members join and leave, see every committed change (``on_commit``, with its author), and offer
HTTP/websocket routes. Every document change a service makes goes through ``room.commit`` with
``Origin.SERVER`` — the one funnel — never straight into the Doc.

One small base class instead of a long list of hook names: override only what you need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from collab.bus import BusMessage
    from collab.connection import Connection
    from collab.hub import Hub
    from collab.protocol import ExtensionMessage
    from collab.room import Origin, Room


class Service:
    name: ClassVar[str] = "service"
    message_types: ClassVar[frozenset[str]] = frozenset()
    bus_kinds: ClassVar[frozenset[str]] = frozenset()

    async def start(self, hub: Hub) -> None:
        """Called once the hub runs; ``hub.spawn`` gives tasks owned by the hub's task group."""

    async def stop(self) -> None:
        """Called while draining, before storage closes."""

    async def handle(self, room: Room, conn: Connection, message: ExtensionMessage) -> None:
        """An extension message of one of ``message_types`` from a member of ``room``."""

    def on_join(self, room: Room, conn: Connection) -> None:
        """``conn`` joined ``room`` (after the server's sync step 1 was queued)."""

    def on_leave(self, room: Room, conn: Connection) -> None:
        """``conn`` left ``room``."""

    def on_commit(self, room: Room, origin: Origin, update: bytes, author: str | None) -> None:
        """A change was applied to ``room``'s Doc (it becomes durable right after)."""

    def on_bus(self, room: Room | None, message: BusMessage) -> None:
        """A bus message of one of ``bus_kinds``; ``room`` is None when not loaded here."""

    def routes(self) -> list[BaseRoute]:
        """HTTP or websocket routes this service serves (mounted before the room catch-all)."""
        return []
