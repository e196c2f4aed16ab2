"""The hub: which rooms are loaded, loading them once, unloading them when idle.

Theory of operation
-------------------
* Single-flight load: concurrent joiners of a room that is not loaded share one load task. The
  load subscribes to the bus *first*, then reads storage, so no peer update can fall between the
  two (updates arriving meanwhile are buffered and applied once the Doc exists).
* A failed load leaves nothing behind — no cached empty document that could later overwrite the
  real one — and the joiner is refused with 1013 so it retries.
* A room unloads once it has had no members for ``room_grace_seconds`` and its writer is idle
  (everything durable). Memory follows active rooms.
* Every long-lived task (the room writer, compactions, the janitor) belongs to the hub's task group,
  which the app's lifespan owns. ``drain`` waits for every room to be durable before stopping,
  then folds the rooms' logs into their snapshots for half its budget, so that the first joins
  after a restart read snapshots.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgpack
import pycrdt

from collab import closecodes, protocol
from collab.bus import Bus, BusMessage
from collab.connection import Connection
from collab.logs import get_logger
from collab.metrics import Metrics
from collab.room import EMPTY_UPDATE, Room, RoomWriter
from collab.services import Service
from collab.settings import Settings
from storage import Store


# Control messages a bus synthesizes for the hub (never sent by clients).
CONTROL_NODE_DOWN = "_node-down"  # payload: the dead node's id
CONTROL_RESYNC = "_resync"  # room "" = every loaded room (e.g. after a bus reconnect)
# Share of the drain budget (``drain_seconds``, counted from the drain's start) within which rooms
# are still folded before the process exits; the rest is left for closing the store.
DRAIN_COMPACT_SHARE = 0.5


class RoomUnavailable(Exception):
    """The room could not be loaded (storage down, corrupt data); the joiner should retry."""


class Hub:
    def __init__(self, settings: Settings, store: Store, metrics: Metrics,
                 bus_factory: Callable[[Callable[[BusMessage], None]], Bus],
                 clock: Callable[[], float] = time.monotonic, services: list[Service] | None = None) -> None:
        self.settings = settings
        self.services = list(services or [])
        self._bus_kinds = {kind: svc for svc in self.services for kind in svc.bus_kinds}
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.log = get_logger("collab.hub").bind(node=settings.node_id)
        self.bus = bus_factory(self.deliver)
        self.rooms: dict[str, Room] = {}
        self.connections: set[Connection] = set()
        self._loading: dict[str, asyncio.Future[Room]] = {}
        self._early: dict[str, list[BusMessage]] = {}
        self.writer = RoomWriter(self.store, self.metrics, self.log)
        # Compactions over all rooms, at most this many at once: each takes the store's writer
        # for a snapshot write, and a crowd of them would queue in front of every group commit.
        self.compaction_slots = asyncio.Semaphore(self.settings.compactions_at_once)
        self._tg: asyncio.TaskGroup | None = None
        self.accepting = True
        self._last_resync = clock()

    # -- lifetime ------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str = "task") -> asyncio.Task[Any]:
        """Start a task owned by the hub's task group. Its failure is logged and contained:
        one room's trouble never cancels the group (and with it every other room)."""
        if self._tg is None:
            coro.close()
            raise RuntimeError("hub not running")
        return self._tg.create_task(self._guard(coro, what))

    async def _guard(self, coro: Coroutine[Any, Any, Any], what: str) -> Any:
        try:
            return await coro
        except Exception:
            self.log.exception("background task failed", task=what)
            return None

    @property
    def running(self) -> bool:
        return self._tg is not None

    async def run(self, ready: asyncio.Event) -> None:
        """Run until cancelled; the task group owns the room writer and the janitor."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            await self.bus.start()
            tg.create_task(self.bus.run())
            for service in self.services:
                await service.start(self)
            tg.create_task(self._janitor())
            tg.create_task(self.writer.run())
            ready.set()
            try:
                await asyncio.Event().wait()
            finally:
                self._tg = None

    async def drain(self) -> None:
        """Stop accepting, close every socket with 1012, make every room durable, then fold the
        logs of the rooms that have one (see ``_compact_for_restart``)."""
        self.accepting = False
        deadline = time.monotonic() + self.settings.drain_seconds * DRAIN_COMPACT_SHARE
        for conn in list(self.connections):
            conn.close(closecodes.SERVER_RESTART, "server restarting")
        for room in list(self.rooms.values()):
            await room.wait_idle()
        await self._compact_for_restart(deadline)
        for service in self.services:
            await service.stop()
        for future in list(self._loading.values()):
            future.cancel()
        await self.bus.stop()

    async def _compact_for_restart(self, deadline: float) -> None:
        """Fold each loaded room's log into its snapshot, longest log first, one at a time, until
        ``deadline``: the first join after the restart then reads one snapshot instead of
        replaying the log (the automerge-paper document with 706 updates of tail: a room load of
        ~20 ms, ~15 ms once folded). Rooms left when time runs out keep their log; nothing is lost
        either way (compaction is optimistic and never drops an update)."""
        rooms = sorted((r for r in self.rooms.values() if r.tail_updates > 0 and not r.poisoned),
                       key=lambda r: r.tail_updates, reverse=True)
        for done, room in enumerate(rooms):
            if time.monotonic() >= deadline:
                self.log.info("drain: rooms left unfolded", rooms=len(rooms) - done)
                return
            if room.compaction is not None:
                await asyncio.wait([room.compaction])
            if room.tail_updates > 0:
                await room.compact()

    # -- rooms ---------------------------------------------------------------------------------

    async def acquire(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is not None and not room.poisoned:
            return room
        future = self._loading.get(name)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._loading[name] = future
            self.spawn(self._load_into(name, future), what="room load")
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.cancelled():
                raise RoomUnavailable("room load cancelled") from None
            raise

    async def _load_into(self, name: str, future: asyncio.Future[Room]) -> None:
        """Single flight: every joiner awaits ``future``; a failure reaches them, not the group."""
        try:
            room = await self._load(name)
        except BaseException as exc:
            if not future.done():
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
                    future.exception()  # retrieved: joiners may all have gone away meanwhile
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            if not future.done():
                future.set_result(room)
        finally:
            self._loading.pop(name, None)

    async def _load(self, name: str) -> Room:
        started = time.perf_counter()
        self._early[name] = []
        try:
            await self.bus.subscribe(name)
            state = await self.store.load(name)
            doc = pycrdt.Doc()
            if state.snapshot:
                doc.apply_update(state.snapshot)
            for update in state.updates:
                doc.apply_update(update)
        except Exception as exc:
            self._early.pop(name, None)
            try:
                await self.bus.unsubscribe(name)
            except Exception:  # noqa: BLE001 - already failing; the load error is what matters
                pass
            self.metrics.storage_errors.inc()
            self.log.exception("room load failed", room=name)
            raise RoomUnavailable(name) from exc
        s = self.settings
        room = Room(name, doc, store=self.store, bus=self.bus, metrics=self.metrics, clock=self.clock,
                    log=self.log, tail_updates=len(state.updates), tail_bytes=state.tail_bytes,
                    compact_after_updates=s.compact_after_updates, compact_after_bytes=s.compact_after_bytes,
                    max_client_ids=s.max_client_ids, on_poisoned=self._unload_poisoned, spawn=self.spawn,
                    services=self.services, writer=self.writer, compaction_slots=self.compaction_slots)
        self.rooms[name] = room
        self.metrics.rooms_loaded.set(len(self.rooms))
        for message in self._early.pop(name, []):
            self._deliver_to(room, message)
        self.request_sync(room)
        self.metrics.room_load_seconds.observe(time.perf_counter() - started)
        self.log.debug("room loaded", room=name, tail=len(state.updates), seconds=round(time.perf_counter() - started, 4))
        return room

    def _unload_poisoned(self, room: Room) -> None:
        self._forget(room)

    def _forget(self, room: Room) -> None:
        if self.rooms.get(room.name) is room:
            del self.rooms[room.name]
        self.metrics.rooms_loaded.set(len(self.rooms))
        self.spawn(self._after_unload(room), what="unload")

    async def _after_unload(self, room: Room) -> None:
        if room.name not in self.rooms and room.name not in self._loading:
            await self.bus.unsubscribe(room.name)
        if room.tail_updates > 0 and not room.poisoned:
            # Fold the log now so that the next cold join reads one snapshot.
            if room.compaction is not None:
                await asyncio.wait([room.compaction])
            await room.compact()

    def unload_idle(self) -> None:
        now = self.clock()
        for room in list(self.rooms.values()):
            if (room.empty_since is not None and now - room.empty_since >= self.settings.room_grace_seconds
                    and room.idle):
                self._forget(room)
                self.log.debug("room unloaded", room=room.name)

    # -- connections ---------------------------------------------------------------------------

    def register(self, conn: Connection) -> None:
        self.connections.add(conn)

    def unregister(self, conn: Connection) -> None:
        self.connections.discard(conn)

    # -- bus -----------------------------------------------------------------------------------

    def deliver(self, message: BusMessage) -> None:
        kind = message.kind
        if kind in (CONTROL_NODE_DOWN, CONTROL_RESYNC):
            for svc in self.services:  # control messages reach every service that lists them, then the hub
                if kind in svc.bus_kinds:
                    svc.on_bus(self.rooms.get(message.room), message)
        elif (service := self._bus_kinds.get(kind)) is not None:
            service.on_bus(self.rooms.get(message.room), message)
            return
        if kind == CONTROL_NODE_DOWN:
            node = message.payload.decode()
            self.log.warning("peer node down; removing its presence", peer=node)
            for room in list(self.rooms.values()):
                room.presence.on_node_down(node)
            return
        if kind == CONTROL_RESYNC:
            targets = [self.rooms[message.room]] if message.room in self.rooms else (
                list(self.rooms.values()) if not message.room else [])
            for room in targets:
                self.request_sync(room)
            return
        room = self.rooms.get(message.room)
        if room is not None:
            self._deliver_to(room, message)
        elif message.room in self._early:
            self._early[message.room].append(message)

    def _deliver_to(self, room: Room, message: BusMessage) -> None:
        kind = message.kind
        try:
            if kind == "update":
                room.deliver_update(message.payload)
            elif kind == "awareness":
                room.deliver_awareness(message.node, message.payload)
            elif kind == "sync-request":
                self._answer_sync(room, message.node, message.payload, ask_back=True)
            elif kind == "sync-reply":
                reply = msgpack.unpackb(message.payload)
                if reply.get("update"):
                    room.deliver_update(reply["update"])
                if reply.get("awareness"):
                    room.deliver_awareness(message.node, reply["awareness"])
                if reply.get("sv") is not None:
                    self._answer_sync(room, message.node, reply["sv"], ask_back=False)
        except Exception:  # noqa: BLE001 - a malformed peer message must not take the hub down
            self.log.exception("bad bus message", room=room.name, kind=kind, peer=message.node)

    # -- anti-entropy between nodes --------------------------------------------------------------
    # Pub/sub is at-most-once, so nodes exchange state vectors: on room load, on a sequence gap,
    # after a bus reconnect and periodically. Replies are computed only once everything the
    # replier has applied is durable, so a peer never relays what storage does not hold.

    def request_sync(self, room: Room) -> None:
        self.bus.publish(room.name, "sync-request", room.doc.get_state())

    def _answer_sync(self, room: Room, node: str, state_vector: bytes, *, ask_back: bool) -> None:
        def reply() -> None:
            diff = room.doc.get_update(state_vector)
            body: dict[str, Any] = {"update": b"" if diff == EMPTY_UPDATE else diff}
            if ask_back:
                body["sv"] = room.doc.get_state()
                body["awareness"] = room.presence.local_entries()
            elif not body["update"]:
                return
            self.bus.publish(room.name, "sync-reply", msgpack.packb(body), target=node)

        room.after_durable(reply)

    # -- housekeeping --------------------------------------------------------------------------

    async def _janitor(self) -> None:
        s = self.settings
        while True:
            await asyncio.sleep(min(1.0, s.keepalive_seconds / 3, max(s.room_grace_seconds, 0.05)))
            self.housekeeping()

    def housekeeping(self) -> None:
        now = self.clock()
        s = self.settings
        wall = time.time()
        for conn in list(self.connections):
            expires = conn.identity.expires_at
            if expires is not None and wall >= expires:
                conn.close(closecodes.UNAUTHORIZED, "token expired")
            elif now - conn.last_sent >= s.keepalive_seconds:
                conn.last_sent = now
                conn.send(protocol.KEEPALIVE_FRAME)
        for room in list(self.rooms.values()):
            room.presence.expire(s.awareness_timeout_seconds)
        if now - self._last_resync >= s.resync_seconds:
            self._last_resync = now
            for room in list(self.rooms.values()):
                self.request_sync(room)
        self.unload_idle()
