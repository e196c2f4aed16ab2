"""Per-user undo and redo, derived from the attributed update log.

Theory of operation
-------------------
* The truth is the store: every row of a room's log carries its author and time, and every
  undo/redo the server ever made is *marked* by a metadata key (``undo/op/<digest of the row>`` =
  who, undo or redo, how many groups it consumed), written durably *before* the change is
  committed. Stacks are derived state: any node can rebuild them, after a reconnect, on another
  node or after a restart, by replaying the log. Nothing is node-local but a cache.
* ``UndoLog`` (pure, no I/O) is that replay: a private Doc with garbage collection off (deleted
  content must stay available to be re-inserted), fed the room's rows in log order. A recorder
  UndoManager captures each row as a ``StackItem`` (the ids it inserted, the ids it deleted); the
  rows of one user whose timestamps are less than the capture window apart form one group; a new
  edit clears that user's redo stack; marked rows move groups between the user's stacks instead.
* An undo runs pycrdt's own UndoManager over the chosen group *in the replay doc* — Yjs semantics:
  only that group's items are touched, so other users' edits before and after stay — and the
  resulting update is committed to the live room through the one funnel
  (``room.commit(Origin.SERVER, update, author=user)``): persisted, relayed, published. It is a
  concurrent change like any other, so the live doc (which may already hold newer, not yet
  durable edits) merges it. When its row comes back from the log the replay doc already holds it.
* The replay doc is built on first use in a room (a connection sends an undo message), then
  follows the log after every commit, and is dropped with the room. All work on it is serialized
  per room by one lock; requests run in hub-owned tasks, never in a connection's reader.

Limits: undo reaches back as far as the store keeps history (``history_keep`` rows per room); if
retention pruned a room's oldest rows, edits that depended on them are replayed unattributed and
cannot be undone after a rebuild. Two undos by the same user on two nodes at the same instant may
be ordered differently in a node's cache than in the log until that node rebuilds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import pycrdt

from collab import protocol
from collab.logs import get_logger
from collab.room import Origin
from collab.services import Service

if TYPE_CHECKING:
    from collab.connection import Connection
    from collab.hub import Hub
    from collab.protocol import ExtensionMessage
    from collab.room import Room
    from storage import StoredUpdate

log = get_logger("collab.undo")

OP_PREFIX: Final = "undo/op/"
DEFAULT_CAPTURE_MS: Final = 500
DEFAULT_DEPTH: Final = 100
HISTORY_PAGE: Final = 500
REPLAY_YIELD_ROWS: Final = 256  # give the event loop a turn this often while replaying
MAX_PENDING_PER_CONNECTION: Final = 8  # undo requests one connection may have queued
DURABLE_TIMEOUT_SECONDS: Final = 30.0
MARKER_GRACE_SECONDS: Final = 600.0  # markers without a row are kept this long (their commit may be in flight)
MAX_REQUEST_ID_CHARS: Final = 128
MAX_LOCAL_DIGESTS: Final = 100_000  # past this (replay stalled), rows are classified by marker lookups

_REPLAY: Final = "collab.undo.replay"

Kind = Literal["undo", "redo"]


class UndoUnavailable(Exception):
    """The room cannot serve undo right now (storage failing, room unloading); try again."""


def digest(update: bytes) -> str:
    return hashlib.blake2b(update, digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class Op:
    """What a marked row was: ``user``'s undo or redo, consuming ``consumed`` groups."""

    user: str
    kind: Kind
    consumed: int
    ts: float = 0.0

    def encode(self) -> bytes:
        return json.dumps({"u": self.user, "k": self.kind, "n": self.consumed, "ts": self.ts}).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> Op | None:
        if raw is None:
            return None
        try:
            body = json.loads(raw)
            kind = body["k"]
            if kind not in ("undo", "redo"):
                return None
            return cls(str(body["u"]), kind, int(body["n"]), float(body.get("ts", 0.0)))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(slots=True)
class Prepared:
    """An undo/redo computed in the replay doc, waiting for its row to come back from the log."""

    update: bytes
    op: Op
    inverse: pycrdt.StackItem | None  # goes onto the other stack when the row lands
    digest: str


@dataclass(slots=True)
class Stacks:
    undo: list[pycrdt.StackItem] = field(default_factory=list)
    redo: list[pycrdt.StackItem] = field(default_factory=list)
    last_ts: float = -math.inf
    open: bool = False  # the next edit may join the top group


class UndoLog:
    """A room's log replayed into a private Doc, with every author's undo and redo stacks."""

    def __init__(self, *, capture_seconds: float = DEFAULT_CAPTURE_MS / 1000, depth: int = DEFAULT_DEPTH,
                 client_id: int | None = None) -> None:
        self.capture_seconds = capture_seconds
        self.depth = depth
        self.doc: pycrdt.Doc = pycrdt.Doc(skip_gc=True, client_id=client_id)
        self._recorder = pycrdt.UndoManager(capture_timeout_millis=0)
        self._recorder.include_origin(_REPLAY)
        self._scoped: set[str] = set()
        self.users: dict[str, Stacks] = {}
        self.pending: dict[str, Prepared] = {}
        self.last_id = 0
        self.rows = 0

    # -- following the log ---------------------------------------------------------------------

    def apply(self, row: StoredUpdate, op: Op | None = None, *, row_digest: str | None = None) -> None:
        """Replay one stored row. ``op``: the row's marker, if it is an undo/redo."""
        prepared = self.pending.pop(row_digest or digest(row.data), None)
        before = self.doc.get_state()
        with self.doc.transaction(origin=_REPLAY):
            self.doc.apply_update(row.data)
        captured = self._recorder.undo_stack
        item = captured[-1] if captured else None
        if captured:
            self._recorder.clear()
        after = self.doc.get_state()
        if after != before:
            new_roots = self._scope_new_roots()
            if item is None and new_roots:
                # The recorder only sees roots it was scoped to before the change: a row that touched
                # nothing but roots it created is described by what it inserted (it cannot have
                # deleted anything older in them).
                item = self._inserted_between(before, after)
        self.last_id = max(self.last_id, row.id)
        self.rows += 1
        if prepared is not None:
            self._moved(prepared.op, prepared.inverse)
        elif op is not None:
            self._moved(op, item)
        elif row.author is not None and item is not None:
            self._edited(row.author, row.ts, item)

    def fill_base(self, update: bytes) -> None:
        """Apply content the log no longer has (pruned by retention), attributed to nobody."""
        self.doc.apply_update(update)
        self._scope_new_roots()

    def lacks(self, update: bytes) -> bytes | None:
        """The part of ``update`` (e.g. the room's snapshot) this replay lacks, or None."""
        missing = pycrdt.get_update(update, self.doc.get_state())
        return missing if _has_structs(missing) else None

    def _edited(self, user: str, ts: float, item: pycrdt.StackItem) -> None:
        stacks = self.users.setdefault(user, Stacks())
        if stacks.open and stacks.undo and ts - stacks.last_ts < self.capture_seconds:
            stacks.undo[-1] = pycrdt.StackItem.merge(stacks.undo[-1], item)
        else:
            stacks.undo.append(item)
            self._trim(stacks.undo)
        stacks.redo.clear()
        stacks.open = True
        stacks.last_ts = ts

    def _moved(self, op: Op, inverse: pycrdt.StackItem | None) -> None:
        stacks = self.users.setdefault(op.user, Stacks())
        source, target = (stacks.undo, stacks.redo) if op.kind == "undo" else (stacks.redo, stacks.undo)
        del source[max(0, len(source) - op.consumed):]
        if inverse is not None:
            target.append(inverse)
            self._trim(target)
        stacks.open = False

    def _trim(self, stack: list[pycrdt.StackItem]) -> None:
        if len(stack) > self.depth:
            del stack[: len(stack) - self.depth]

    def _scope_new_roots(self) -> list[str]:
        new = [name for name in self.doc if name not in self._scoped]
        for name in new:
            # Any shared type will do as a scope (the undo manager compares branches); the replay
            # doc is private, so casting a root to Text here changes nothing anyone sees.
            self._recorder.expand_scope(self.doc.get(name, type=pycrdt.Text))
            self._scoped.add(name)
        return new

    def _inserted_between(self, before: bytes, after: bytes) -> pycrdt.StackItem | None:
        start, end = decode_state_vector(before), decode_state_vector(after)
        ranges = [(client, start.get(client, 0), clock - start.get(client, 0))
                  for client, clock in sorted(end.items()) if clock > start.get(client, 0)]
        if not ranges:
            return None
        raw = bytearray()
        protocol.write_var_uint(raw, len(ranges))
        for client, clock, length in ranges:
            for value in (client, 1, clock, length):
                protocol.write_var_uint(raw, value)
        return pycrdt.StackItem(self.doc, pycrdt.IdSet(), pycrdt.IdSet.decode(bytes(raw)))

    # -- undo and redo -------------------------------------------------------------------------

    def state(self, user: str) -> tuple[bool, bool]:
        stacks = self.users.get(user)
        return (bool(stacks.undo), bool(stacks.redo)) if stacks else (False, False)

    def prepare(self, user: str, kind: Kind, *, now: float = 0.0) -> Prepared | None:
        """Revert ``user``'s newest undo (or redo) group in the replay doc and return the change.

        The stacks move only when the change's row is replayed (``apply``), so every node derives
        the same stacks from the same log. Groups that no longer change anything (others removed
        all of it) are skipped, as Yjs does, and counted in the marker. If none is left the stack
        is emptied here without a row: other nodes still list those void groups until they are
        asked and find the same (harmless: a void group never changes the document).
        """
        stacks = self.users.get(user)
        if stacks is None:
            return None
        source = stacks.undo if kind == "undo" else stacks.redo
        for consumed, item in enumerate(reversed(source), 1):
            update, inverse = self._revert(item)
            if update is not None:
                prepared = Prepared(update, Op(user, kind, consumed, now), inverse, digest(update))
                self.pending[prepared.digest] = prepared
                return prepared
        source.clear()
        return None

    def _revert(self, item: pycrdt.StackItem) -> tuple[bytes | None, pycrdt.StackItem | None]:
        scopes = [self.doc.get(name, type=pycrdt.Text) for name in list(self.doc.keys())]
        manager = pycrdt.UndoManager(scopes=scopes, capture_timeout_millis=0, undo_stack=[item])
        captured: list[bytes] = []
        subscription = self.doc.observe(lambda event: captured.append(bytes(event.update)))
        try:
            changed = manager.undo()
        finally:
            self.doc.unobserve(subscription)
        if not changed or not captured:
            return None, None
        redo = manager.redo_stack
        update = captured[0] if len(captured) == 1 else pycrdt.merge_updates(*captured)
        return update, (redo[-1] if redo else None)


def decode_state_vector(state: bytes) -> dict[int, int]:
    count, pos = protocol.read_var_uint(state, 0)
    clocks: dict[int, int] = {}
    for _ in range(count):
        client, pos = protocol.read_var_uint(state, pos)
        clocks[client], pos = protocol.read_var_uint(state, pos)
    return clocks


def _has_structs(update: bytes) -> bool:
    clients, _ = protocol.read_var_uint(update, 0)
    return clients > 0


# -- the service ---------------------------------------------------------------------------------


@dataclass(eq=False)
class _RoomUndo:
    room: Room
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    log: UndoLog | None = None
    markers: dict[str, Op] = field(default_factory=dict)
    local: Counter[str] = field(default_factory=Counter)  # digests of edits committed on this node
    watchers: dict[Connection, tuple[bool, bool] | None] = field(default_factory=dict)
    following: bool = False
    dirty: bool = False


class UndoService(Service):
    """Extension messages ``undo``, ``redo`` and ``undo.state`` (see README "Undo and redo")."""

    name = "undo"
    message_types = frozenset({"undo", "redo", "undo.state"})

    def __init__(self, *, capture_ms: int | None = None, depth: int | None = None) -> None:
        self._capture_ms = capture_ms
        self._depth = depth
        self._hub: Hub | None = None
        self._rooms: dict[str, _RoomUndo] = {}
        self._busy: Counter[Connection] = Counter()

    async def start(self, hub: Hub) -> None:
        self._hub = hub
        settings = hub.settings
        if self._capture_ms is None:
            self._capture_ms = int(getattr(settings, "undo_capture_ms", DEFAULT_CAPTURE_MS))
        if self._depth is None:
            self._depth = int(getattr(settings, "undo_depth", DEFAULT_DEPTH))
        hub.spawn(self._sweep(), what="undo sweeper")

    async def stop(self) -> None:
        self._rooms.clear()

    # -- messages ------------------------------------------------------------------------------

    async def handle(self, room: Room, conn: Connection, message: ExtensionMessage) -> None:
        kind = message.type
        request_id = message.body.get("id")
        if not _valid_id(request_id):
            conn.send(_error(None, kind, "bad-request", "'id' must be a string, an integer or absent"))
            return
        if kind != "undo.state" and not conn.identity.can_edit:
            conn.send(_error(request_id, kind, "forbidden", "viewers cannot undo or redo"))
            return
        if self._busy[conn] >= MAX_PENDING_PER_CONNECTION:
            conn.send(_error(request_id, kind, "busy", "too many undo requests in flight"))
            return
        if self._hub is None or not self._hub.running:
            conn.send(_error(request_id, kind, "unavailable", "the server is shutting down"))
            return
        entry = self._entry(room)
        entry.watchers.setdefault(conn, None)
        self._busy[conn] += 1
        self._hub.spawn(self._serve(entry, conn, kind, request_id), what="undo request")

    def on_leave(self, room: Room, conn: Connection) -> None:
        entry = self._rooms.get(room.name)
        if entry is not None:
            entry.watchers.pop(conn, None)

    def on_commit(self, room: Room, origin: Origin, update: bytes, author: str | None) -> None:
        entry = self._rooms.get(room.name)
        if entry is None or entry.room is not room:
            return
        if origin is not Origin.PEER and len(entry.local) < MAX_LOCAL_DIGESTS:
            key = digest(update)
            if entry.log is None or key not in entry.log.pending:
                entry.local[key] += 1  # a plain edit: no marker lookup needed when its row lands
        entry.dirty = True
        if not entry.following and self._hub is not None and self._hub.running:
            entry.following = True
            self._hub.spawn(self._follow(entry), what="undo follower")

    # -- requests ------------------------------------------------------------------------------

    async def _serve(self, entry: _RoomUndo, conn: Connection, kind: str, request_id: Any) -> None:
        room, user = entry.room, conn.identity.user_id
        try:
            async with entry.lock:
                undo_log = await self._current(entry)
                applied = False
                if kind in ("undo", "redo"):
                    operation: Kind = "undo" if kind == "undo" else "redo"
                    prepared = undo_log.prepare(user, operation, now=time.time())
                    if prepared is not None:
                        await self._commit(entry, prepared, user)
                        applied = True
                        await self._durable(room)
                        await self._catch_up(entry)
                state = undo_log.state(user)
            if conn in entry.watchers:
                entry.watchers[conn] = state
            conn.send(protocol.encode_extension(
                {"type": "undo.state", "id": request_id, "can_undo": state[0], "can_redo": state[1],
                 "applied": applied}))
            self._push(entry)
        except Exception as exc:
            if not isinstance(exc, UndoUnavailable):
                log.exception("undo request failed", room=room.name, user=user, kind=kind)
            conn.send(_error(request_id, kind, "unavailable", "undo is unavailable right now; try again"))
        finally:
            self._busy[conn] -= 1
            if self._busy[conn] <= 0:
                del self._busy[conn]

    async def _commit(self, entry: _RoomUndo, prepared: Prepared, user: str) -> None:
        room = entry.room
        try:
            # Marker first: a row in the log is never mistaken for an edit; a marker whose commit
            # never happened is harmless (no row has its digest) and is cleaned up later.
            await room.store.put_meta(room.name, OP_PREFIX + prepared.digest, prepared.op.encode())
            entry.markers[prepared.digest] = prepared.op
            room.commit(Origin.SERVER, prepared.update, author=user)
        except BaseException:
            self._drop(entry)  # the replay doc holds a change the log will never have
            raise

    async def _current(self, entry: _RoomUndo) -> UndoLog:
        """The room's replay, built if needed and caught up with everything applied so far."""
        if self._hub is not None and self._hub.rooms.get(entry.room.name) is not entry.room:
            raise UndoUnavailable("room unloaded")
        await self._durable(entry.room)
        if entry.log is None:
            await self._build(entry)
        else:
            await self._catch_up(entry)
        assert entry.log is not None
        return entry.log

    # -- following the log ---------------------------------------------------------------------

    async def _follow(self, entry: _RoomUndo) -> None:
        try:
            while entry.dirty:
                entry.dirty = False
                await asyncio.sleep(0)  # let the commit that woke us enqueue itself first
                try:
                    await self._durable(entry.room)
                except UndoUnavailable:
                    return
                async with entry.lock:
                    if entry.log is None:
                        return  # not built (yet): whoever builds it reads up to the head
                    try:
                        await self._catch_up(entry)
                    except Exception:
                        log.exception("undo replay failed; dropping it", room=entry.room.name)
                        self._drop(entry)
                        return
                self._push(entry)
        finally:
            entry.following = False

    async def _catch_up(self, entry: _RoomUndo) -> None:
        undo_log, store, name = entry.log, entry.room.store, entry.room.name
        assert undo_log is not None
        while True:
            rows = await store.history(name, after_id=undo_log.last_id, limit=HISTORY_PAGE)
            for row in rows:
                key = digest(row.data)
                op = None if key in undo_log.pending else await self._classify(entry, row, key, lookup=True)
                undo_log.apply(row, op, row_digest=key)
            if len(rows) < HISTORY_PAGE:
                return
            await asyncio.sleep(0)

    async def _classify(self, entry: _RoomUndo, row: StoredUpdate, key: str, *, lookup: bool) -> Op | None:
        if entry.local[key] > 0:
            entry.local[key] -= 1
            if entry.local[key] <= 0:
                del entry.local[key]
            return None
        if row.author is None:
            return None
        op = entry.markers.get(key)
        if op is None and lookup:
            # A row this node did not commit (another node's, or one from before we followed):
            # the marker, if any, was stored before the row was.
            op = Op.decode(await entry.room.store.get_meta(entry.room.name, OP_PREFIX + key))
            if op is not None:
                entry.markers[key] = op
        return op if op is not None and op.user == row.author else None

    async def _build(self, entry: _RoomUndo) -> None:
        room, store = entry.room, entry.room.store
        started = time.perf_counter()
        # Snapshot first, then the history: whatever the snapshot holds that the replay lacks was
        # pruned (not merely appended after we looked).
        state = await store.load(room.name)
        rows: list[StoredUpdate] = []
        after = 0
        while True:
            page = await store.history(room.name, after_id=after, limit=HISTORY_PAGE)
            rows += page
            if len(page) < HISTORY_PAGE:
                break
            after = page[-1].id
        markers = {key[len(OP_PREFIX):]: op for key, raw in (await store.list_meta(room.name, OP_PREFIX)).items()
                   if (op := Op.decode(raw)) is not None}
        entry.markers = markers
        assert self._capture_ms is not None and self._depth is not None
        undo_log = UndoLog(capture_seconds=self._capture_ms / 1000, depth=self._depth,
                           client_id=_fresh_client_id(room.doc.get_state()))
        seen: set[str] = set()
        for index, row in enumerate(rows, 1):
            key = digest(row.data)
            seen.add(key)
            undo_log.apply(row, await self._classify(entry, row, key, lookup=False), row_digest=key)
            if index % REPLAY_YIELD_ROWS == 0:
                await asyncio.sleep(0)
        if state.snapshot and (missing := undo_log.lacks(state.snapshot)) is not None:
            log.info("undo history starts after pruned rows; older edits cannot be undone", room=room.name)
            undo_log.fill_base(missing)
        entry.log = undo_log
        await self._catch_up(entry)  # rows appended while we replayed
        stale = [key for key, op in markers.items() if key not in seen and op.ts < time.time() - MARKER_GRACE_SECONDS]
        if stale:
            assert self._hub is not None
            self._hub.spawn(self._forget_markers(entry, stale), what="undo marker cleanup")
        log.debug("undo replay built", room=room.name, rows=len(rows), users=len(undo_log.users),
                  seconds=round(time.perf_counter() - started, 4))

    async def _forget_markers(self, entry: _RoomUndo, keys: list[str]) -> None:
        for key in keys:
            await entry.room.store.put_meta(entry.room.name, OP_PREFIX + key, None)
            entry.markers.pop(key, None)

    # -- helpers -------------------------------------------------------------------------------

    def _entry(self, room: Room) -> _RoomUndo:
        entry = self._rooms.get(room.name)
        if entry is None or entry.room is not room:
            entry = self._rooms[room.name] = _RoomUndo(room)
        return entry

    def _drop(self, entry: _RoomUndo) -> None:
        entry.log = None
        entry.local.clear()

    def _push(self, entry: _RoomUndo) -> None:
        undo_log = entry.log
        if undo_log is None:
            return
        for conn, last in list(entry.watchers.items()):
            state = undo_log.state(conn.identity.user_id)
            if state != last:
                entry.watchers[conn] = state
                conn.send(protocol.encode_extension(
                    {"type": "undo.state", "can_undo": state[0], "can_redo": state[1]}))

    async def _durable(self, room: Room) -> None:
        """Wait until every change applied to ``room`` so far is in the store."""
        if room.poisoned:
            raise UndoUnavailable("room poisoned")
        done = asyncio.get_running_loop().create_future()
        room.after_durable(lambda: None if done.done() else done.set_result(None))
        try:
            await asyncio.wait_for(done, DURABLE_TIMEOUT_SECONDS)
        except TimeoutError:
            raise UndoUnavailable("room did not become durable") from None

    async def _sweep(self) -> None:
        """Drop the replay of rooms that unloaded (memory follows loaded rooms)."""
        assert self._hub is not None
        while True:
            await asyncio.sleep(2.0)
            for name, entry in list(self._rooms.items()):
                if self._hub.rooms.get(name) is not entry.room and not entry.lock.locked():
                    del self._rooms[name]


def _valid_id(value: Any) -> bool:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return True
    return isinstance(value, str) and len(value) <= MAX_REQUEST_ID_CHARS


def _error(request_id: Any, ref: str, code: str, message: str) -> bytes:
    return protocol.encode_extension({"type": "error", "id": request_id, "ref": ref, "code": code,
                                      "message": message})


def _fresh_client_id(state: bytes) -> int:
    """A random 32-bit client id (like Yjs's) that the room has never used."""
    used = decode_state_vector(state)
    while True:
        candidate = random.getrandbits(32)
        if candidate not in used:
            return candidate

