"""The presence service: collaborators list, workspace presence and its live feed, across nodes.

Endpoints (with a server secret, each needs a token: ``?token=``, ``Authorization: Bearer`` or,
for the websocket, sub-protocol ``bearer.<jwt>``; results only cover rooms the token allows)

``GET /api/rooms/<room>/presence``
    The collaborators list of one room: every user (once, however many tabs), their sessions,
    name, colour, role, connected since, last active, idle, and each awareness client's cursor /
    selection resolved to absolute offsets in the server's copy of the document.
``GET /api/presence?prefix=<p>``
    Which users are in which rooms whose name starts with ``p``, cluster-wide.
``ws://host/presence?prefix=<p>`` and ``GET /api/presence/events?prefix=<p>`` (SSE)
    A ``snapshot`` first, then ``join`` / ``leave`` / ``idle`` / ``active`` events (JSON text
    frames; SSE ``event:`` names the type). A subscriber that does not keep up is closed with 1013
    (SSE: the stream ends) — reconnect and start from a new snapshot.

Theory of operation
-------------------
* Rooms call this service on join/leave/commit; the first join configures the room's
  ``RoomPresence`` (coalescing window, rate limit, viewer policy, counters).
* The cluster view lives in a ``Registry`` fed by the ``_presence`` bus channel (``presence.
  registry`` explains the protocol). Messages are msgpack maps ``{"op": up|down|snap|hello|bye,
  "s": [...]}``. A ``_node-down`` from the bus drops that node's sessions at once.
* One background task (owned by the hub's task group) flips idle flags, re-announces this node's
  sessions every ``sync_seconds`` and drops silent nodes. ``tick()`` is that task's body, so a
  test with a fake clock advances the clock and calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, ClassVar

import msgpack
from prometheus_client import Counter, Gauge
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from collab import closecodes
from collab.auth import AccessDenied, Identity, dev_identity, token_from, verify_token
from collab.logs import get_logger
from collab.services import Service
from presence.collaborators import collaborators, remote_clients
from presence.config import PresenceSettings
from presence.feeds import Feeds
from presence.registry import Event, Registry, SessionRecord
from presence.room import PresenceStats, RoomPresence, Session
from presence.stamp import color_for

if TYPE_CHECKING:
    from collab.bus import BusMessage
    from collab.connection import Connection
    from collab.hub import Hub
    from collab.room import Origin, Room

CHANNEL = "_presence"
BUS_KIND = "presence"
NODE_DOWN = "_node-down"  # collab.hub.CONTROL_NODE_DOWN
RESYNC = "_resync"  # collab.hub.CONTROL_RESYNC
COLD_ROOM_WAIT = 0.5  # seconds a cold collaborators list waits for peers' awareness

log = get_logger("collab.presence")


class PresenceService(Service):
    name: ClassVar[str] = "presence"
    bus_kinds: ClassVar[frozenset[str]] = frozenset({BUS_KIND, NODE_DOWN, RESYNC})

    def __init__(self, settings: PresenceSettings | None = None) -> None:
        self._override = settings
        self.cfg = settings or PresenceSettings()
        self.hub: Hub | None = None
        self.node = ""
        self.registry = Registry()
        self.feeds = Feeds(self.cfg.feed_max, self.cfg.feed_queue, on_change=self._gauge)
        self.stats = PresenceStats()
        self._task: asyncio.Task[Any] | None = None
        self._last_snap = 0.0
        self._last_hello = float("-inf")
        self._metrics_ready = False

    # -- lifetime ------------------------------------------------------------------------------

    async def start(self, hub: Hub) -> None:
        self.hub = hub
        self.cfg = (self._override or PresenceSettings.from_settings(hub.settings)).replace(
            node_id=hub.settings.node_id, secret=hub.settings.secret)
        self.node = hub.settings.node_id
        self.feeds.max_feeds, self.feeds.queue = self.cfg.feed_max, self.cfg.feed_queue
        self._setup_metrics(hub)
        self._last_snap = hub.clock()
        await hub.bus.subscribe(CHANNEL)
        self._send({"op": "hello"})
        self._task = hub.spawn(self._loop(), what="presence ticker")

    async def stop(self) -> None:
        self.feeds.close_all(closecodes.SERVER_RESTART, "server restarting")
        if self._task is not None:
            self._task.cancel()
        if self.hub is not None:
            self._send({"op": "bye"})
            with contextlib.suppress(Exception):
                await self.hub.bus.unsubscribe(CHANNEL)

    def _setup_metrics(self, hub: Hub) -> None:
        registry = getattr(hub.metrics, "registry", None)
        if registry is None or self._metrics_ready:
            return
        self.stats = PresenceStats(
            changes=Counter("collab_presence_changes", "Awareness changes accepted from this node's clients",
                            registry=registry),
            frames=Counter("collab_presence_frames", "Awareness frames queued to clients", registry=registry),
            entries=Counter("collab_presence_entries",
                            "Awareness entries delivered to clients (entries x recipients)", registry=registry),
            flushes=Counter("collab_presence_flushes", "Coalesced awareness relays", registry=registry),
            throttled=Counter("collab_presence_throttled",
                              "Awareness changes dropped by the per-connection rate limit "
                              "(the latest is relayed later)", registry=registry),
            refused=Counter("collab_presence_refused",
                            "Awareness states not relayed (not a JSON object, NaN/Infinity, hidden viewer)",
                            registry=registry),
        )
        self.m_sessions = Gauge("collab_presence_sessions", "Sessions in the cluster-wide presence registry",
                                registry=registry)
        self.m_feeds = Gauge("collab_presence_feeds", "Open workspace presence feeds on this node", registry=registry)
        self._metrics_ready = True

    async def _loop(self) -> None:
        period = max(0.05, min(1.0, self.cfg.idle_seconds / 4, self.cfg.sync_seconds / 2))
        while True:
            await asyncio.sleep(period)
            try:
                self.tick(snapshot=False)
                await self._snapshot_in_steps()
            except Exception:
                log.exception("presence tick failed")

    async def _snapshot_in_steps(self, step: int = 200) -> None:
        """The periodic re-announcement, built ``step`` sessions per loop iteration: with
        thousands of sessions, building it in one go stalls every room for tens of ms."""
        hub = self.hub
        if hub is None or not self._snapshot_due(hub.clock()):
            return
        offset = time.time() - hub.clock()
        built: list[tuple[RoomPresence, Any, Session, SessionRecord]] = []
        for room in list(hub.rooms.values()):
            presence = room.presence
            for member, session in list(presence.sessions.items()):
                built.append((presence, member, session, self._record(room.name, presence, session, offset)))
                if len(built) % step == 0:
                    await asyncio.sleep(0)
        # Sessions that left (or were replaced) while we yielded are not announced.
        self._announce([record for presence, member, session, record in built
                        if presence.sessions.get(member) is session])

    def _snapshot_due(self, now: float) -> bool:
        """True (and the next one scheduled) if a re-announcement is due at ``now``."""
        if now - self._last_snap < self.cfg.sync_seconds:
            return False
        self._last_snap = now
        return True

    def _announce(self, records: list[SessionRecord]) -> None:
        self._emit(self.registry.replace_node(self.node, records))
        self._send({"op": "snap", "s": [r.to_wire() for r in records]})

    def tick(self, *, snapshot: bool = True) -> None:
        """Idle flags, periodic re-announcement (unless ``snapshot`` is False: the loop builds
        it in steps), silent nodes. Driven by the clock only."""
        hub = self.hub
        if hub is None:
            return
        now = hub.clock()
        flipped: list[SessionRecord] = []
        for room in list(hub.rooms.values()):
            presence = self._adopt(room)  # rooms loaded without a local join too (cold lists)
            for session in presence.idle_changes(self.cfg.idle_seconds):
                flipped.append(self._record(room.name, presence, session))
        if flipped:
            self._local_change(flipped, ())
        if snapshot and self._snapshot_due(now):
            self._announce(self._local_records())
        for node in self.registry.silent_nodes(now, 3 * self.cfg.sync_seconds, self.node):
            log.info("presence: peer silent; dropping its sessions", peer=node)
            self._emit(self.registry.drop_node(node))
        self._gauge()

    # -- rooms ---------------------------------------------------------------------------------

    def _adopt(self, room: Room) -> RoomPresence:
        presence = room.presence
        if presence.configured_by is not self:
            name = room.name
            presence.configure(self.cfg, room=name, stats=self.stats, by=self,
                               on_change=lambda session: self._local_change([self._record(name, presence, session)], ()))
        return presence

    def on_join(self, room: Room, conn: Connection) -> None:
        presence = self._adopt(room)
        session = presence.sessions.get(conn)
        if session is not None:
            self._local_change([self._record(room.name, presence, session)], ())

    def on_leave(self, room: Room, conn: Connection) -> None:
        self._local_change((), [self._sid(conn)])

    def on_commit(self, room: Room, origin: Origin, update: bytes, author: str | None) -> None:
        if author and getattr(origin, "value", origin) != "peer":
            room.presence.touch_user(author)

    def _sid(self, conn: Any) -> str:
        return f"{self.node}/{conn.id}"

    def _record(self, room: str, presence: RoomPresence, session: Session,
                offset: float | None = None) -> SessionRecord:
        """``offset``: wall minus hub clock, computed once for a batch of records."""
        if offset is None:
            assert self.hub is not None
            offset = time.time() - self.hub.clock()
        member = session.member
        ident = member.identity
        return SessionRecord(
            sid=self._sid(member), node=self.node, room=room, user=ident.user_id, name=ident.name, role=ident.role,
            color=session.color or color_for(ident.user_id),
            connected_at=session.connected_at + offset, last_active=session.last_active + offset,
            idle=session.idle, hidden=session.hidden)

    def _local_records(self) -> list[SessionRecord]:
        assert self.hub is not None
        offset = time.time() - self.hub.clock()
        return [self._record(room.name, room.presence, session, offset)
                for room in list(self.hub.rooms.values()) for session in room.presence.sessions.values()]

    def _local_change(self, upserts: Any, removals: Any) -> None:
        upserts, removals = list(upserts), list(removals)
        events = self.registry.upsert(upserts) if upserts else []
        if removals:
            events += self.registry.remove(removals)
        self._emit(events)
        if upserts:
            self._send({"op": "up", "s": [r.to_wire() for r in upserts]})
        if removals:
            self._send({"op": "down", "s": removals})
        self._gauge()

    def _gauge(self) -> None:
        if self._metrics_ready:
            self.m_sessions.set(len(self.registry))
            self.m_feeds.set(len(self.feeds))

    # -- the bus -------------------------------------------------------------------------------

    def _send(self, body: dict[str, Any], target: str | None = None) -> None:
        if self.hub is None:
            return
        try:
            self.hub.bus.publish(CHANNEL, BUS_KIND, msgpack.packb(body), target)
        except Exception:
            log.warning("presence bus publish failed", exc_info=True)

    def on_bus(self, room: Room | None, message: BusMessage) -> None:
        try:
            self._on_bus(message)
        except Exception:
            log.warning("bad presence bus message", peer=message.node, exc_info=True)

    def _on_bus(self, message: BusMessage) -> None:
        hub = self.hub
        if hub is None:
            return
        if message.kind == NODE_DOWN:
            node = message.payload.decode()
            self._emit(self.registry.drop_node(node))
            self._gauge()
            return
        if message.kind == RESYNC:
            if message.room in ("", CHANNEL):
                self._hello()
            return
        if message.room != CHANNEL or message.node == self.node:
            return
        node = message.node
        body = msgpack.unpackb(message.payload)
        op = body.get("op") if isinstance(body, dict) else None
        self.registry.heard[node] = hub.clock()
        if op == "up":
            self._emit(self.registry.upsert(_records(node, body.get("s"))))
        elif op == "down":
            sids = [sid for sid in body.get("s") or () if isinstance(sid, str) and sid.startswith(node + "/")]
            self._emit(self.registry.remove(sids))
        elif op == "snap":
            self._emit(self.registry.replace_node(node, _records(node, body.get("s"))))
        elif op == "hello":
            self._send({"op": "snap", "s": [r.to_wire() for r in self._local_records()]}, target=node)
        elif op == "bye":
            self._emit(self.registry.drop_node(node))
        self._gauge()

    def _hello(self) -> None:
        """Ask every peer for its sessions (after a bus reconnect or a gap), at most once a second."""
        assert self.hub is not None
        now = time.monotonic()
        if now - self._last_hello < 1.0:
            return
        self._last_hello = now
        self._send({"op": "hello"})
        self._send({"op": "snap", "s": [r.to_wire() for r in self._local_records()]})

    # -- feeds and routes ----------------------------------------------------------------------

    def _emit(self, events: list[Event]) -> None:
        self.feeds.emit(events)

    def _snapshot(self, prefix: str, identity: Identity) -> dict[str, Any]:
        rooms = self.registry.rooms(prefix)
        return {"type": "snapshot", "prefix": prefix,
                "rooms": [{"room": room, "users": [v.public() for v in views]}
                          for room, views in rooms.items() if identity.allows(room)]}

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/presence", self.workspace, methods=["GET"]),
            Route("/api/presence/events", self.events, methods=["GET"]),
            Route("/api/rooms/{room:path}/presence", self.collaborators, methods=["GET"]),
            WebSocketRoute("/presence", self.feed_socket),
        ]

    def _identify(self, conn: WebSocket | Request) -> Identity:
        token, _ = token_from(conn)
        if self.cfg.secret is None:
            return dev_identity(conn.query_params.get("name"))
        if not token:
            raise AccessDenied("token required", closecodes.UNAUTHORIZED)
        return verify_token(self.cfg.secret, token)

    def _http_identity(self, request: Request) -> Identity | Response:
        try:
            return self._identify(request)
        except AccessDenied as denied:
            return JSONResponse({"error": denied.reason}, status_code=401)

    async def workspace(self, request: Request) -> Response:
        identity = self._http_identity(request)
        if isinstance(identity, Response):
            return identity
        body = self._snapshot(request.query_params.get("prefix", ""), identity)
        del body["type"]
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def collaborators(self, request: Request) -> Response:
        identity = self._http_identity(request)
        if isinstance(identity, Response):
            return identity
        name = request.path_params["room"]
        if not identity.allows(name):
            return JSONResponse({"error": "room not allowed"}, status_code=403)
        return JSONResponse(await self.collaborators_of(name), headers={"Cache-Control": "no-store"})

    async def collaborators_of(self, name: str) -> dict[str, Any]:
        hub = self.hub
        assert hub is not None
        remote = [r for r in self.registry.in_room(name) if r.node != self.node]
        room = hub.rooms.get(name)
        if room is None and remote and hub.accepting:
            # Active elsewhere only: load it here (it unloads after the grace period) so that
            # cursors can be resolved; peers answer the load's sync request with their awareness.
            try:
                room = await hub.acquire(name)
            except Exception:  # noqa: BLE001 - the list without cursors is still an answer
                room = None
            if room is not None:
                self._adopt(room)
                wanted = {r.sid for r in remote}
                deadline = time.monotonic() + COLD_ROOM_WAIT
                while time.monotonic() < deadline and not wanted <= {k.session for _, k in room.presence.entries()}:
                    await asyncio.sleep(0.02)
        return self._collaborators(name, room, remote)

    def _collaborators(self, name: str, room: Room | None, remote: list[SessionRecord]) -> dict[str, Any]:
        presence = room.presence if room is not None else None
        sessions: list[tuple[SessionRecord, list[int]]] = []
        if presence is not None:
            sessions += [(self._record(name, presence, session), sorted(presence.awareness.owned_by(member)))
                         for member, session in presence.sessions.items()]
            by_session = remote_clients(presence)
            sessions += [(r, by_session.get(r.sid, [])) for r in remote]
        else:
            sessions += [(r, []) for r in remote]
        return collaborators(name, sessions, presence, room.doc if room is not None else None, self.cfg.idle_seconds)

    async def feed_socket(self, ws: WebSocket) -> None:
        _, subprotocol = token_from(ws)
        prefix = ws.query_params.get("prefix", "")
        try:
            identity = self._identify(ws)
        except AccessDenied as denied:
            await ws.accept(subprotocol=subprotocol)  # accept first: a refused upgrade looks like 1006
            await ws.close(denied.code, denied.reason)
            return
        await ws.accept(subprotocol=subprotocol)
        feed = self._admit(prefix, identity)
        if feed is None:
            draining = self.hub is None or not self.hub.accepting
            await ws.close(closecodes.SERVER_RESTART if draining else closecodes.TRY_AGAIN_LATER,
                           "server draining" if draining else "too many feeds")
            return
        await self.feeds.serve_socket(ws, feed)

    async def events(self, request: Request) -> Response:
        identity = self._http_identity(request)
        if isinstance(identity, Response):
            return identity
        feed = self._admit(request.query_params.get("prefix", ""), identity)
        if feed is None:
            return JSONResponse({"error": "unavailable"}, status_code=503, headers={"Retry-After": "1"})
        return StreamingResponse(self.feeds.stream(feed), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    def _admit(self, prefix: str, identity: Identity) -> Any:
        if self.hub is None or not self.hub.accepting:
            return None
        return self.feeds.admit(prefix, identity, self._snapshot(prefix, identity))


def _records(node: str, rows: Any) -> list[SessionRecord]:
    out = []
    for row in rows or ():
        try:
            out.append(SessionRecord.from_wire(node, row))
        except (ValueError, TypeError):
            continue
    return out
