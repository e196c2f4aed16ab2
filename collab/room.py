"""A room: one document, its members, its awareness — and the single funnel for changes.

Theory of operation
-------------------
* ``commit(origin, update)`` is the only code path that changes the document. It applies the
  update to the Doc (which is how pycrdt validates it semantically) and enqueues it; the hub's
  writer then makes the queued batch durable and only afterwards relays it. What happens to a
  change — stored? relayed to local members? published to other nodes? — is decided by its origin
  in one table, ``EFFECTS``.
* Durable before relayed: the hub's one ``RoomWriter`` takes, in rounds, the queued batch of every
  room that has one, stores all their updates in one call (one group commit), then walks each
  room's batch in order. A sync reply computed while updates were still in flight is queued
  behind them (``reply_after_durable``), so no joiner ever sees state that storage does not have.
  One writer for all rooms, not a task per room: no task wake-up, future or event per room per
  commit — at thousands of updates per second in hundreds of rooms that was a tenth of the CPU.
* If storage fails, the in-memory Doc is ahead of storage. The room is then *poisoned*: every
  member is closed with 1013 and the room is unloaded; on reconnect the room reloads from storage
  and the clients' own sync step 2 re-sends what was lost. Nothing undurable is ever relayed.
* Each client connection can have at most ``max_inflight`` updates and ``max_inflight_bytes``
  awaiting commit; past that its reader pauses (TCP backpressure) — a flood cannot queue
  unbounded work.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pycrdt

from collab import closecodes, protocol
from collab.protocol import (
    AwarenessUpdate,
    ExtensionMessage,
    Message,
    ProtocolError,
    QueryAwareness,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
)
from collab.services import Service
from collab.wsfast import wire_frame
from collab.ydoc import apply_update
from presence import RoomPresence

if TYPE_CHECKING:
    from collab.bus import Bus
    from collab.connection import Connection
    from collab.metrics import Metrics
    from storage import Store


class Origin(enum.Enum):
    CLIENT = "client"  # a member of this room on this node
    PEER = "peer"  # another node, via the bus (it already stored the change)
    SERVER = "server"  # the server itself: undo, REST, seeding


EMPTY_UPDATE = b"\x00\x00"  # no structs, empty delete set


@dataclass(frozen=True, slots=True)
class Effects:
    persist: bool
    relay: bool
    publish: bool


EFFECTS: dict[Origin, Effects] = {
    Origin.CLIENT: Effects(persist=True, relay=True, publish=True),
    Origin.PEER: Effects(persist=False, relay=True, publish=False),
    Origin.SERVER: Effects(persist=True, relay=True, publish=True),
}


@dataclass(slots=True)
class _Pending:
    effects: Effects | None  # None: a deferred action (``then``), not an update
    frame: bytes
    then: Callable[[], None] | None = None
    update: bytes = b""
    source: Connection | None = None
    author: str | None = None
    received: float = 0.0


class Room:
    def __init__(self, name: str, doc: pycrdt.Doc, *, store: Store, bus: Bus, metrics: Metrics,
                 clock: Callable[[], float], log, tail_updates: int = 0, tail_bytes: int = 0,
                 compact_after_updates: int = 500, compact_after_bytes: int = 1 << 20,
                 max_client_ids: int = 8, on_poisoned: Callable[[Room], None] | None = None,
                 spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]] | None = None,
                 services: list[Service] | None = None, writer: RoomWriter,
                 compaction_slots: asyncio.Semaphore) -> None:
        self.name = name
        self.doc = doc
        self.store = store
        self.bus = bus
        self.metrics = metrics
        self.clock = clock
        self.log = log.bind(room=name)
        self.members: set[Connection] = set()
        self.presence = RoomPresence(
            broadcast=self._broadcast, publish=lambda payload: bus.publish(name, "awareness", payload),
            clock=clock, max_client_ids=max_client_ids, on_rejected=metrics.awareness_rejected.inc)
        self.empty_since: float | None = clock()
        self.poisoned = False
        self.tail_updates = tail_updates
        self.tail_bytes = tail_bytes
        self.compact_after_updates = compact_after_updates
        self.compact_after_bytes = compact_after_bytes
        self.compaction: asyncio.Task[None] | None = None
        # The hub's: how many compactions may run at once, over all rooms.
        self.compaction_slots = compaction_slots
        self._compact_scale = self._draw_scale()
        self._on_poisoned = on_poisoned
        self._spawn = spawn or asyncio.get_running_loop().create_task
        self.services = services or []
        self._by_type = {t: svc for svc in self.services for t in svc.message_types}
        self._commit_watchers = [svc for svc in self.services if type(svc).on_commit is not Service.on_commit]
        self._queue: list[_Pending] = []
        self.writer = writer  # the hub's: persists and relays what this room queues
        self._scheduled = False  # in the writer's list for its next round
        self._undurable = 0  # updates applied to the Doc but not yet committed
        self._idle = asyncio.Event()
        self._idle.set()

    # -- membership ----------------------------------------------------------------------------

    def join(self, conn: Connection) -> None:
        self.members.add(conn)
        self.empty_since = None
        self.metrics.connections.inc()
        conn.send(protocol.encode_sync_step1(self.doc.get_state()))
        self.presence.on_join(conn)
        for service in self.services:
            service.on_join(self, conn)

    def leave(self, conn: Connection) -> None:
        if conn not in self.members:
            return
        self.members.discard(conn)
        self.metrics.connections.dec()
        self.presence.on_leave(conn)
        for service in self.services:
            service.on_leave(self, conn)
        if not self.members:
            self.empty_since = self.clock()

    @property
    def idle(self) -> bool:
        """Nothing queued or in flight: safe to unload."""
        return self._idle.is_set() and not self._queue

    async def wait_idle(self) -> None:
        while not self.idle:
            await self._idle.wait()
            await asyncio.sleep(0)

    # -- messages from members -----------------------------------------------------------------

    def handle_now(self, conn: Connection, message: Message) -> bool:
        """Handle ``message`` synchronously if it needs no waiting (nearly all traffic).

        False — with nothing done — for what must be awaited: an update past its connection's
        in-flight bound, or a service's message. The caller then awaits ``handle``."""
        kind = type(message)
        if kind is SyncUpdate or kind is SyncStep2:
            if message.update == EMPTY_UPDATE:
                return True  # every client's answer to our step 1 when it has nothing new: not a change
            if not conn.identity.can_edit:
                self.metrics.updates_rejected.inc()
                if not conn.told_read_only:
                    conn.told_read_only = True
                    conn.send(protocol.encode_permission_denied("read-only: your edits are not saved"))
                return True
            if not conn.inflight.try_acquire(len(message.update)):
                return False
            self._commit_from(conn, message.update)
        elif isinstance(message, SyncStep1):
            self.reply_after_durable(conn, protocol.encode_sync_step2(self.doc.get_update(message.state_vector)))
        elif isinstance(message, AwarenessUpdate):
            self.presence.on_message(conn, message.entries)
        elif isinstance(message, QueryAwareness):
            self.presence.on_query(conn)
        elif isinstance(message, ExtensionMessage):
            if message.type in self._by_type:
                return False
            conn.send(protocol.encode_extension(
                {"type": "error", "code": "unknown-type", "ref": message.type[:100],
                 "message": "no service handles this message type"}))
        # AuthMessage: clients have nothing to tell us here; the token is the only credential
        return True

    async def handle(self, conn: Connection, message: Message) -> None:
        if not self.handle_now(conn, message):
            await self.handle_later(conn, message)

    async def handle_later(self, conn: Connection, message: Message) -> None:
        """What ``handle_now`` refused: wait for an in-flight slot, or for the service."""
        if isinstance(message, SyncUpdate | SyncStep2):
            await conn.inflight.acquire(len(message.update))
            self._commit_from(conn, message.update)
        elif isinstance(message, ExtensionMessage):
            await self._by_type[message.type].handle(self, conn, message)

    def _commit_from(self, conn: Connection, update: bytes) -> None:
        """A member's update, its in-flight slot already taken (given back if refused)."""
        try:
            self.commit(Origin.CLIENT, update, source=conn, author=conn.identity.user_id)
        except BaseException:
            conn.inflight.release(len(update))
            raise

    def _broadcast(self, frame: bytes, exclude: Connection | None) -> None:
        for member in self.members:
            if member is not exclude:
                member.send(frame)

    # -- the funnel ----------------------------------------------------------------------------

    def commit(self, origin: Origin, update: bytes, *, source: Connection | None = None,
               author: str | None = None) -> None:
        if self.poisoned:
            raise ProtocolError("room unavailable", closecodes.TRY_AGAIN_LATER)
        try:
            # Who made the change travels with it (``author``, stored with the row), not as a
            # transaction origin: nothing observes this Doc's transactions, and an explicit
            # transaction per update is a third of what applying it costs.
            apply_update(self.doc, update)
        except Exception:
            raise ProtocolError("update rejected by the document") from None
        self._committed(origin, update, source, author)

    def change(self, fn: Callable[[pycrdt.Doc], object], *, author: str | None = None) -> bytes:
        """A change the server makes (undo, REST, seeding): ``fn`` edits the Doc — in its own
        transaction(s), e.g. ``UndoManager.undo()`` — and the resulting update is persisted,
        relayed and published exactly like a client's. Returns the update (``00 00`` if none)."""
        if self.poisoned:
            raise ProtocolError("room unavailable", closecodes.TRY_AGAIN_LATER)
        captured: list[bytes] = []
        subscription = self.doc.observe(lambda event: captured.append(bytes(event.update)))
        try:
            fn(self.doc)
        finally:
            self.doc.unobserve(subscription)
        if not captured:
            return EMPTY_UPDATE
        update = captured[0] if len(captured) == 1 else pycrdt.merge_updates(*captured)
        self._committed(Origin.SERVER, update, None, author)
        return update

    def _committed(self, origin: Origin, update: bytes, source: Connection | None, author: str | None) -> None:
        effects = EFFECTS[origin]
        if origin is Origin.CLIENT:
            self.metrics.updates_in.value += 1  # a LoopCounter: lock-free, event loop only
        for service in self._commit_watchers:
            service.on_commit(self, origin, update, author)
        frame = protocol.encode_update(update)
        self._enqueue(_Pending(effects, frame, None, update, source, author, time.perf_counter()))

    def reply_after_durable(self, conn: Connection, frame: bytes) -> None:
        """Send ``frame`` to one member once every update applied so far is durable."""
        self.after_durable(lambda: conn.send(frame))

    def after_durable(self, action: Callable[[], None]) -> None:
        """Run ``action`` once every update applied so far is durable (at once if it already is)."""
        if self._undurable == 0 and not self._queue:
            action()
        else:
            self._enqueue(_Pending(None, b"", then=action))

    def _enqueue(self, item: _Pending) -> None:
        if self.poisoned:
            return
        if item.effects is not None and item.effects.persist:
            self._undurable += 1
        self._queue.append(item)
        self._idle.clear()
        if not self._scheduled:
            self._scheduled = True
            self.writer.schedule(self)

    def _take(self) -> list[_Pending]:
        """The writer starts a round: everything queued so far."""
        batch, self._queue = self._queue, []
        self._scheduled = False
        return batch

    def _stored(self, batch: list[_Pending], stored: list[_Pending]) -> None:
        """The writer's round made ``stored`` (this batch's persisted updates) durable."""
        if stored:
            self._undurable -= len(stored)
            self.tail_updates += len(stored)
            self.tail_bytes += sum([len(p.update) for p in stored])
        self._relay(batch)
        if not self._queue:
            self._idle.set()
        self._maybe_compact()

    def _relay(self, batch: list[_Pending]) -> None:
        members = self.members
        relayed = 0
        touched: set[Connection] = set()
        alone = len(batch) == 1  # nothing to gather per member: written as it is relayed
        for item in batch:
            source = item.source
            if item.effects is None:
                if item.then is not None:
                    item.then()
                continue
            if item.effects.relay and members:
                frame = item.frame
                wire = wire_frame(frame)  # built once, shared by every member's outbox
                for member in members:
                    if member is source:
                        continue
                    if alone:
                        if member.deliver(frame, wire):
                            relayed += 1
                    elif member.push_encoded(frame, wire):
                        touched.add(member)
                        relayed += 1
            if item.effects.publish:
                self.bus.publish(self.name, "update", item.update)
            if source is not None:
                source.inflight.release(len(item.update))
            self.metrics.relay_seconds.observe(time.perf_counter() - item.received)
        for member in touched:
            member.flush()  # each member's share of the batch in one write
        if relayed:
            self.metrics.updates_relayed.inc(relayed)

    def fail(self, batch: Sequence[_Pending] = ()) -> None:
        """Storage failed, or a bug in handling ``batch``: close everyone, unload (see the top)."""
        if not self.poisoned:
            self._poison([*batch, *self._queue])

    def _poison(self, batch: list[_Pending]) -> None:
        self.poisoned = True
        for item in batch:
            if item.effects is not None and item.source is not None:
                item.source.inflight.release(len(item.update))
        for member in list(self.members):
            member.close(closecodes.TRY_AGAIN_LATER, "storage unavailable")
        self._queue.clear()
        self._idle.set()
        if self._on_poisoned is not None:
            self._on_poisoned(self)

    # -- compaction ----------------------------------------------------------------------------

    # A room compacts at a random point between half and all of the configured thresholds, drawn
    # again after each compaction: rooms loaded together and edited at the same pace (a class, a
    # load test) would otherwise all reach the threshold in the same second — hundreds of folds
    # and snapshot writes at once, queued in front of the group commits (a p99 of 260 ms at
    # 10,000 updates/s in 250 rooms, against 20 ms before and after).

    @staticmethod
    def _draw_scale() -> float:
        return random.uniform(0.5, 1.0)  # noqa: S311 - spreading work, not a secret

    def _maybe_compact(self) -> None:
        if self.compaction is not None and not self.compaction.done():
            return
        scale = self._compact_scale
        if (self.tail_updates >= self.compact_after_updates * scale
                or self.tail_bytes >= self.compact_after_bytes * scale):
            self.compaction = self._spawn(self.compact())  # owned by the hub's task group

    async def compact(self) -> None:
        """Fold the room's log into its snapshot, in one of the hub's compaction slots."""
        async with self.compaction_slots:
            counted_updates, counted_bytes = self.tail_updates, self.tail_bytes
            try:
                if await self.store.compact(self.name):
                    self.metrics.compactions.inc()
                self.tail_updates -= counted_updates
                self.tail_bytes -= counted_bytes
                self._compact_scale = self._draw_scale()
            except Exception:
                self.metrics.storage_errors.inc()
                self.log.exception("compaction failed")

    # -- the bus -------------------------------------------------------------------------------

    def deliver_update(self, update: bytes) -> None:
        try:
            self.commit(Origin.PEER, update)
        except ProtocolError:
            self.log.warning("peer update rejected")

    def deliver_awareness(self, node: str, payload: bytes) -> None:
        try:
            self.presence.on_peer(node, payload)
        except Exception:  # noqa: BLE001 - a malformed peer message is dropped, not fatal
            self.log.warning("bad awareness payload from peer", peer=node)


class RoomWriter:
    """The one writer of a hub's rooms: persist every queued batch, then relay each in order.

    Rooms ``schedule`` themselves when something is queued; a round takes every scheduled room's
    batch, stores all their updates with one ``append_rows`` (one group commit), and then, room by
    room, relays the batch and runs its deferred actions. What rooms queue meanwhile is the next
    round, so each room's order holds. If the commit fails, every room with updates in it is
    poisoned (see the module docstring); a room whose handling raises is poisoned alone, and the
    writer goes on with the others."""

    def __init__(self, store: Store, metrics: Metrics, log) -> None:
        self.store = store
        self.metrics = metrics
        self.log = log
        self._ready: list[Room] = []
        self._wake = asyncio.Event()

    def schedule(self, room: Room) -> None:
        self._ready.append(room)
        self._wake.set()

    async def run(self) -> None:
        """Owned by the hub's task group; returns only when cancelled."""
        while True:
            if not self._ready:
                self._wake.clear()
                await self._wake.wait()
                continue
            rooms, self._ready = self._ready, []
            try:
                await self._round(rooms)
            except Exception:  # a bug: those rooms are closed and reloaded, the others go on
                self.log.exception("room writer round failed")
                for room in rooms:
                    room.fail()

    async def _round(self, rooms: list[Room]) -> None:
        taken: list[tuple[Room, list[_Pending], list[_Pending]]] = []
        rows: list[tuple[str, bytes, str | None]] = []
        for room in rooms:
            batch = room._take()
            if room.poisoned:
                continue
            stored = [p for p in batch if p.effects is not None and p.effects.persist]
            taken.append((room, batch, stored))
            name = room.name
            rows += [(name, p.update, p.author) for p in stored]
        failed: set[Room] = set()
        if rows:
            started = time.perf_counter()
            try:
                await self.store.append_rows(rows, ts=time.time())
            except ValueError:
                # A row the store refuses, found before anything was queued: only its room fails.
                failed = await self._room_by_room(taken)
            except Exception:
                self.log.exception("storage append failed; closing the members of its rooms")
                failed = {room for room, _batch, stored in taken if stored}
            else:
                self.metrics.commit_seconds.observe(time.perf_counter() - started)
        for room, batch, stored in taken:
            if room in failed:
                self.metrics.storage_errors.inc()
                room.fail(batch)
                continue
            try:
                room._stored(batch, stored)
            except Exception:
                # Part of the batch may be relayed (and its in-flight slots given back): the
                # room is closed and reloaded from storage, which has all of it.
                self.log.exception("relaying a batch failed; closing the room's members", room=room.name)
                room.fail()

    async def _room_by_room(self, taken: list[tuple[Room, list[_Pending], list[_Pending]]]) -> set[Room]:
        failed: set[Room] = set()
        for room, _batch, stored in taken:
            if stored:
                try:
                    await self.store.append_many(room.name, [(p.update, p.author) for p in stored], ts=time.time())
                except Exception:
                    room.log.exception("storage append failed; closing room members")
                    failed.add(room)
        return failed
