"""In-editor chat: a chat per room, persisted, live on every node, messages anchored to the text.

Theory of operation
-------------------
* Messages travel on the document socket as extension messages (type 101, JSON). The server stamps
  everything a client could lie about: the message id (sortable, see ``MessageIds``), the author
  (id and name from the token — fields the client sends for them are ignored) and the time.
* Every write is durable before anyone hears of it: the store commits, then the change is pushed
  to this node's members of the room and published on the bus (kind ``chat``); other nodes push
  it to theirs. The bus is at-most-once, so a lost publish costs liveness only: storage is shared
  and history (pushed on every join, paged on request) is always complete.
* Requests are handled off the socket's reader, one at a time per connection, in order, by a task
  owned by the hub; a connection may have ``MAX_PENDING_PER_CONNECTION`` queued. Refusals (too
  long, over the rate, not allowed, unknown message) are ``error`` replies; the connection stays.
* Rate: a token bucket per user on each node (``chat_rate``/s sustained, ``chat_burst`` at once)
  counts writes (send, edit, delete, react). With N nodes a user could reach N times the rate.
* Anchors are a Yjs relative-position range ``{"start": RelPos, "end": RelPos}`` (the JSON of
  ``Y.relativePositionToJSON``). They are stored as given and resolved to current offsets against
  the room's live document whenever a message is served, so a comment follows its text. The HTTP
  history resolves against the live room if loaded here, else against the stored document.
* Mentions: ``@<user id>`` or ``@<display name>`` (case-insensitive, longest match) of a user known
  in the room — anyone who ever joined it. Known users are stored on join, batched: every
  joiner queued meanwhile in one transaction (``chat_put_users``), not a commit per join.
* Permissions: anyone who may open the room may read and send (viewers included: comment-only
  reviewers); authors edit their own messages; authors and ``MODERATOR_ROLES`` delete any.
* Typing indicators are not chat messages: clients put ``{"chat": {"typing": true}}`` in their
  awareness state (presence), which is ephemeral and never stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Final

import pycrdt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from collab import protocol
from collab.auth import AccessDenied, Identity, authenticate, dev_identity, token_from, verify_token
from collab.closecodes import UNAUTHORIZED
from collab.logs import get_logger
from collab.services import Service
from presence.cursors import Resolver
from storage import ChatMessage
from storage.chat import MAX_CHAT_PUT_USERS

if TYPE_CHECKING:
    from collab.bus import BusMessage
    from collab.connection import Connection
    from collab.hub import Hub
    from collab.protocol import ExtensionMessage
    from collab.room import Room

log = get_logger("collab.chat")

# Roles that may delete anyone's message ("owner" arrives with invites; tokens may not carry it yet).
MODERATOR_ROLES: Final = frozenset({"owner", "editor"})

DEFAULT_MAX_CHARS: Final = 4000
DEFAULT_RATE: Final = 1.0  # writes per second per user, sustained
DEFAULT_BURST: Final = 10
DEFAULT_HISTORY_ON_JOIN: Final = 50
DEFAULT_MAX_PAGE: Final = 200
MAX_PENDING_PER_CONNECTION: Final = 16
MAX_REQUEST_ID_CHARS: Final = 128
MAX_ID_CHARS: Final = 64
MAX_EMOJI_CHARS: Final = 32
MAX_ANCHOR_BYTES: Final = 4096
MAX_BUCKETS: Final = 100_000  # users with a rate bucket on this node before idle ones are dropped
KNOWN_USERS_CACHE: Final = 100_000  # (room, user, name) known to be stored already
MAX_UNSAVED_USERS: Final = MAX_CHAT_PUT_USERS  # joiners waiting to be stored as known users (one write)

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_POSITION_FIELDS = frozenset({"type", "tname", "item", "assoc"})

MESSAGE_TYPES: Final = frozenset({"chat.send", "chat.edit", "chat.delete", "chat.react", "chat.history", "chat.read"})
WRITES: Final = frozenset({"chat.send", "chat.edit", "chat.delete", "chat.react"})


class Refused(Exception):
    """A request the server declines; ``code`` and ``message`` go back to the client."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


@dataclasses.dataclass(frozen=True, slots=True)
class ChatSettings:
    max_chars: int = DEFAULT_MAX_CHARS
    rate: float = DEFAULT_RATE
    burst: int = DEFAULT_BURST
    history_on_join: int = DEFAULT_HISTORY_ON_JOIN
    max_page: int = DEFAULT_MAX_PAGE
    secret: str | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> ChatSettings:
        return cls(
            max_chars=int(getattr(settings, "chat_max_chars", DEFAULT_MAX_CHARS)),
            rate=float(getattr(settings, "chat_rate", DEFAULT_RATE)),
            burst=int(getattr(settings, "chat_burst", DEFAULT_BURST)),
            history_on_join=int(getattr(settings, "chat_history_on_join", DEFAULT_HISTORY_ON_JOIN)),
            max_page=int(getattr(settings, "chat_max_page", DEFAULT_MAX_PAGE)),
            secret=getattr(settings, "secret", None),
        )


# -- ids -----------------------------------------------------------------------------------------


class MessageIds:
    """ULID-style ids: 48-bit milliseconds + 80 random bits, Crockford base32, 26 characters.

    They sort by time as strings. Within one process they strictly increase even when the clock
    stands still or steps back (the random part is incremented); across nodes the 80 random bits
    make a collision negligible without any coordination. Clock skew between nodes can order two
    nearly simultaneous messages differently from their arrival; every node sees the same order.
    """

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._last_ms = -1
        self._last_rand = 0
        self._lock = threading.Lock()

    def new(self) -> str:
        with self._lock:
            ms = int(self._clock() * 1000)
            if ms <= self._last_ms:
                ms = self._last_ms
                rand = self._last_rand + 1
                if rand >= 1 << 80:
                    ms, rand = ms + 1, int.from_bytes(os.urandom(10), "big") >> 1
            else:
                rand = int.from_bytes(os.urandom(10), "big") >> 1  # headroom for increments
            self._last_ms, self._last_rand = ms, rand
        value = (ms << 80) | rand
        return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


# -- pure helpers ----------------------------------------------------------------------------------


def mentioned(text: str, users: dict[str, str], author: str) -> tuple[str, ...]:
    """Users ``text`` mentions as ``@id`` or ``@name`` (case-insensitive; the longest match at a
    position wins, so ``@Ada Lovelace`` is not also ``@Ada``). The author is never mentioned."""
    lowered = text.casefold()
    best: dict[int, tuple[int, str]] = {}
    for user, name in users.items():
        for handle in {user, name}:
            needle = "@" + handle.casefold()
            if len(needle) < 2:
                continue
            start = lowered.find(needle)
            while start != -1:
                end = start + len(needle)
                if end == len(lowered) or not (lowered[end].isalnum() or lowered[end] == "_"):
                    if start not in best or end > best[start][0]:
                        best[start] = (end, user)
                start = lowered.find(needle, start + 1)
    found = dict.fromkeys(user for _, (_, user) in sorted(best.items()) if user != author)
    return tuple(found)[:50]


def parse_anchor(value: Any) -> str | None:
    """The anchor as compact JSON text, or raise Refused. None when absent."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"start", "end"} or "start" not in value:
        raise Refused("bad-request", "anchor must be {start, end} relative positions")
    clean: dict[str, Any] = {}
    for key in ("start", "end"):
        position = value.get(key, value["start"])
        if not isinstance(position, dict) or not position or set(position) - _POSITION_FIELDS:
            raise Refused("bad-request", f"anchor.{key} is not a relative position")
        clean[key] = position
    text = json.dumps(clean, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > MAX_ANCHOR_BYTES:
        raise Refused("bad-request", "anchor too large")
    return text


def resolve_anchor(anchor: str | None, resolver: Resolver | None) -> dict[str, Any] | None:
    if anchor is None:
        return None
    try:
        stored = json.loads(anchor)
    except ValueError:
        return None
    out: dict[str, Any] = {"start": stored.get("start"), "end": stored.get("end"), "from": None, "to": None,
                           "type": None}
    if resolver is not None:
        start, t1 = resolver.position(out["start"])
        end, t2 = resolver.position(out["end"])
        out["type"] = t1 or t2
        if start is not None and end is not None:
            out["from"], out["to"] = min(start, end), max(start, end)
    return out


def render(message: ChatMessage, resolver: Resolver | None) -> dict[str, Any]:
    """The client-facing shape of a message (see README "Chat")."""
    return {
        "id": message.id,
        "room": message.room,
        "author": {"id": message.author, "name": message.author_name},
        "text": message.text,
        "ts": message.ts,
        "edited_ts": message.edited_ts,
        "deleted": message.deleted,
        "reply_to": message.reply_to,
        "anchor": resolve_anchor(message.anchor, resolver),
        "mentions": list(message.mentions),
        "reactions": {emoji: list(users) for emoji, users in message.reactions.items()},
    }


def _stored_json(message: ChatMessage) -> dict[str, Any]:
    body = dataclasses.asdict(message)
    body["mentions"] = list(message.mentions)
    body["reactions"] = {k: list(v) for k, v in message.reactions.items()}
    return body


def _from_json(body: dict[str, Any]) -> ChatMessage:
    body = dict(body)
    body["mentions"] = tuple(body.get("mentions", ()))
    body["reactions"] = {k: tuple(v) for k, v in body.get("reactions", {}).items()}
    return ChatMessage(**body)


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


# -- the service -----------------------------------------------------------------------------------


class ChatService(Service):
    name = "chat"
    message_types = MESSAGE_TYPES
    bus_kinds = frozenset({"chat"})

    def __init__(self, cfg: ChatSettings | None = None, *, clock: Any = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.ids = MessageIds()
        self._hub: Hub | None = None
        self._queues: dict[Connection, deque[tuple[Room, dict[str, Any]]]] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._known: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        # Joiners not yet stored as known users: room -> user id -> name, written in batches by
        # one task (``_save_users``), never one transaction per join (see ``_remember``).
        self._unsaved: dict[str, dict[str, str]] = {}
        self._unsaved_count = 0
        self._saving: dict[str, dict[str, str]] = {}  # the batch being written (not readable yet)
        self._saver: asyncio.Task[None] | None = None

    async def start(self, hub: Hub) -> None:
        self._hub = hub
        if self.cfg is None:
            self.cfg = ChatSettings.from_settings(hub.settings)

    @property
    def settings(self) -> ChatSettings:
        assert self.cfg is not None, "chat service not started"
        return self.cfg

    # -- socket ----------------------------------------------------------------------------------

    def on_join(self, room: Room, conn: Connection) -> None:
        if self._hub is not None and self._hub.running:
            self._hub.spawn(self._welcome(room, conn), what="chat join")

    def _remember(self, room: str, identity: Identity) -> None:
        """Store ``identity`` as a known user of ``room`` (for @mentions), soon and in a batch.

        One write transaction per join cost a commit each, in line with the document's group
        commits: 1,000 clients reconnecting after a restart held every document edit back for
        2.5 s. Now joins queue here and one task writes all that queued in one transaction, then
        what queued meanwhile. Until stored, ``_users`` counts them from here (and from the room's
        members). Bounded: past ``MAX_UNSAVED_USERS`` waiting, a joiner is not queued (its next
        join tries again; while it is a member, mentions find it anyway)."""
        if (room, identity.user_id, identity.name) in self._known:
            return
        users = self._unsaved.get(room)
        if users is None or identity.user_id not in users:
            if self._unsaved_count >= MAX_UNSAVED_USERS:
                return
            self._unsaved_count += 1
        self._unsaved.setdefault(room, {})[identity.user_id] = identity.name
        if (self._saver is None or self._saver.done()) and self._hub is not None and self._hub.running:
            self._saver = self._hub.spawn(self._save_users(), what="chat known users")

    async def _save_users(self) -> None:
        assert self._hub is not None
        while self._unsaved:
            batch, self._unsaved, self._unsaved_count = self._unsaved, {}, 0
            entries = [(room, user, name) for room, users in batch.items() for user, name in users.items()]
            self._saving = batch
            try:
                await self._hub.store.chat_put_users(entries)
            except Exception:  # noqa: BLE001 - mentions of them may miss; their next join retries
                log.exception("storing known chat users failed", users=len(entries))
                continue
            finally:
                self._saving = {}
            for entry in entries:
                self._known[entry] = None
            while len(self._known) > KNOWN_USERS_CACHE:
                self._known.popitem(last=False)

    def on_leave(self, room: Room, conn: Connection) -> None:
        queue = self._queues.get(conn)
        if queue is not None:
            queue.clear()

    async def _welcome(self, room: Room, conn: Connection) -> None:
        self._remember(room.name, conn.identity)
        limit = self.settings.history_on_join
        if limit <= 0 or conn.closing:
            return
        try:
            rows = await room.store.chat_history(room.name, limit=limit + 1)
        except Exception:  # noqa: BLE001 - the client can ask again with chat.history
            log.exception("loading chat history for a joiner failed", room=room.name)
            return
        conn.send(self._history_frame(room, rows, limit, None))

    def _history_frame(self, room: Room | None, rows: list[ChatMessage], limit: int, request_id: Any) -> bytes:
        has_more = len(rows) > limit
        rows = rows[-limit:] if has_more else rows
        resolver = Resolver.of(room.doc) if room is not None and any(m.anchor for m in rows) else None
        body: dict[str, Any] = {"type": "chat.history", "messages": [render(m, resolver) for m in rows],
                                "has_more": has_more}
        if request_id is not None:
            body["id"] = request_id
        return protocol.encode_extension(body)

    async def handle(self, room: Room, conn: Connection, message: ExtensionMessage) -> None:
        body = message.body
        kind = message.type
        request_id = body.get("id")
        if not _valid_request_id(request_id):
            conn.send(_error(None, kind, "bad-request", "'id' must be a string, an integer or absent"))
            return
        if kind in WRITES and not self._take(conn.identity.user_id):
            cfg = self.settings
            conn.send(_error(request_id, kind, "rate-limited",
                             f"too many chat messages: at most {cfg.burst} at once, {cfg.rate:g} per second",
                             retry_after=round(1.0 / cfg.rate, 3)))
            return
        queue = self._queues.get(conn)
        if queue is None:
            queue = self._queues[conn] = deque()
            start = True
        else:
            start = False
        if len(queue) >= MAX_PENDING_PER_CONNECTION:
            conn.send(_error(request_id, kind, "busy", "too many chat requests in flight"))
            return
        queue.append((room, body))
        if start:
            assert self._hub is not None
            self._hub.spawn(self._drain(conn, queue), what="chat requests")

    async def _drain(self, conn: Connection, queue: deque[tuple[Room, dict[str, Any]]]) -> None:
        try:
            while queue and not conn.closing:
                room, body = queue.popleft()
                await self._serve(room, conn, body)
        finally:
            del self._queues[conn]

    async def _serve(self, room: Room, conn: Connection, body: dict[str, Any]) -> None:
        kind = str(body["type"])
        request_id = body.get("id")
        try:
            reply = await getattr(self, "_" + kind.removeprefix("chat."))(room, conn.identity, body)
        except Refused as refused:
            conn.send(_error(request_id, kind, refused.code, refused.message, **refused.extra))
            return
        except Exception:  # noqa: BLE001 - storage trouble: the client may retry; details are logged
            log.exception("chat request failed", room=room.name, kind=kind)
            conn.send(_error(request_id, kind, "unavailable", "chat is unavailable right now; try again"))
            return
        if request_id is not None or kind == "chat.history":
            conn.send(protocol.encode_extension({**reply, "id": request_id}))

    # -- requests --------------------------------------------------------------------------------

    async def _send(self, room: Room, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
        text = self._text(body.get("text"))
        reply_to = _optional_id(body.get("reply_to"), "reply_to")
        anchor = parse_anchor(body.get("anchor"))
        store = room.store
        if reply_to is not None and await store.chat_get(room.name, reply_to) is None:
            raise Refused("not-found", "reply_to names no message of this room")
        users = await self._users(room)
        message = ChatMessage(
            id=self.ids.new(), room=room.name, author=identity.user_id, author_name=identity.name, text=text,
            ts=time.time(), reply_to=reply_to, anchor=anchor, mentions=mentioned(text, users, identity.user_id))
        await store.chat_add(message)
        rendered = self._announce(room, "chat.message", message)
        return {"type": "chat.ok", "message": rendered}

    async def _edit(self, room: Room, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
        message_id = _required_id(body.get("message_id"))
        text = self._text(body.get("text"))
        current = await self._existing(room, message_id)
        if current.author != identity.user_id:
            raise Refused("forbidden", "only the author may edit a message")
        users = await self._users(room)
        edited = await room.store.chat_edit(room.name, message_id, text,
                                            mentions=mentioned(text, users, identity.user_id), edited_ts=time.time())
        if edited is None:
            raise Refused("not-found", "no such message (or it was deleted)")
        return {"type": "chat.ok", "message": self._announce(room, "chat.updated", edited)}

    async def _delete(self, room: Room, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
        message_id = _required_id(body.get("message_id"))
        current = await self._existing(room, message_id, allow_deleted=True)
        if current.author != identity.user_id and identity.role not in MODERATOR_ROLES:
            raise Refused("forbidden", "only the author or a room owner/editor may delete a message")
        tomb = await room.store.chat_delete(room.name, message_id)
        if tomb is None:
            raise Refused("not-found", "no such message")
        return {"type": "chat.ok", "message": self._announce(room, "chat.deleted", tomb)}

    async def _react(self, room: Room, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
        message_id = _required_id(body.get("message_id"))
        emoji = body.get("emoji")
        if not isinstance(emoji, str) or not emoji.strip() or len(emoji) > MAX_EMOJI_CHARS or "\0" in emoji:
            raise Refused("bad-request", f"emoji must be a non-empty string of at most {MAX_EMOJI_CHARS} characters")
        try:
            reacted = await room.store.chat_react(room.name, message_id, emoji, identity.user_id)
        except ValueError as exc:
            raise Refused("too-many-reactions", str(exc)) from None
        if reacted is None:
            raise Refused("not-found", "no such message (or it was deleted)")
        return {"type": "chat.ok", "message": self._announce(room, "chat.updated", reacted)}

    async def _history(self, room: Room, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
        before = _optional_id(body.get("before"), "before")
        limit = self._limit(body.get("limit"))
        rows = await room.store.chat_history(room.name, before=before, limit=limit + 1)
        has_more = len(rows) > limit
        rows = rows[-limit:] if has_more else rows
        resolver = Resolver.of(room.doc) if any(m.anchor for m in rows) else None
        return {"type": "chat.history", "messages": [render(m, resolver) for m in rows], "has_more": has_more}

    async def _read(self, room: Room, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
        upto = _required_id(body.get("upto"), "upto")
        marked = await room.store.chat_mark_read(identity.user_id, room.name, upto)
        return {"type": "chat.ok", "marked": marked}

    # -- helpers ---------------------------------------------------------------------------------

    def _text(self, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise Refused("bad-request", "text must be a non-empty string")
        limit = self.settings.max_chars
        if len(value) > limit:
            raise Refused("too-long", f"a chat message holds at most {limit} characters", max_chars=limit)
        if "\0" in value:
            raise Refused("bad-request", "text must not contain NUL")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Refused("bad-request", "text is not valid Unicode") from None
        return value

    def _limit(self, value: Any) -> int:
        if value is None:
            return min(50, self.settings.max_page)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise Refused("bad-request", "limit must be a positive integer")
        return min(value, self.settings.max_page)

    async def _existing(self, room: Room, message_id: str, *, allow_deleted: bool = False) -> ChatMessage:
        current = await room.store.chat_get(room.name, message_id)
        if current is None or (current.deleted and not allow_deleted):
            raise Refused("not-found", "no such message (or it was deleted)")
        return current

    async def _users(self, room: Room) -> dict[str, str]:
        # Joined moments ago, not stored yet: queued, or in a write the read below may not see
        # (taken before the read: the write may end, and leave ``_saving``, while it runs).
        waiting = self._waiting_users(room.name)
        users = await room.store.chat_users(room.name)
        users.update(waiting)
        users.update(self._waiting_users(room.name))
        for member in room.members:
            users.setdefault(member.identity.user_id, member.identity.name)
        return users

    def _waiting_users(self, room: str) -> dict[str, str]:
        return {**self._saving.get(room, {}), **self._unsaved.get(room, {})}

    def _take(self, user: str) -> bool:
        cfg = self.settings
        now = self.clock()
        bucket = self._buckets.get(user)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._prune_buckets(now)
            bucket = self._buckets[user] = _Bucket(float(cfg.burst), now)
        bucket.tokens = min(float(cfg.burst), bucket.tokens + (now - bucket.stamp) * cfg.rate)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

    def _prune_buckets(self, now: float) -> None:
        cfg = self.settings
        refill = cfg.burst / cfg.rate
        for user, bucket in list(self._buckets.items()):
            if now - bucket.stamp >= refill:
                del self._buckets[user]
        while len(self._buckets) >= MAX_BUCKETS:
            self._buckets.pop(next(iter(self._buckets)))

    def _announce(self, room: Room, event: str, message: ChatMessage) -> dict[str, Any]:
        """Push a durable change to this node's members and to the other nodes; return its shape."""
        rendered = render(message, Resolver.of(room.doc) if message.anchor else None)
        self._push(room, event, rendered)
        payload = json.dumps({"event": event, "message": _stored_json(message)}, separators=(",", ":"),
                             ensure_ascii=False).encode()
        room.bus.publish(room.name, "chat", payload)
        return rendered

    @staticmethod
    def _push(room: Room, event: str, rendered: dict[str, Any]) -> None:
        body: dict[str, Any] = {"type": event, "message": rendered}
        if event == "chat.deleted":
            body["message_id"] = rendered["id"]
        frame = protocol.encode_extension(body)
        for member in list(room.members):
            member.send(frame)

    def on_bus(self, room: Room | None, message: BusMessage) -> None:
        if room is None or not room.members:
            return  # nobody here to tell; history comes from the shared store
        try:
            body = json.loads(message.payload)
            event = body["event"]
            if event not in ("chat.message", "chat.updated", "chat.deleted"):
                return
            stored = _from_json(body["message"])
        except (ValueError, KeyError, TypeError):
            log.warning("bad chat message on the bus", peer=message.node)
            return
        if stored.room != room.name:
            return
        self._push(room, event, render(stored, Resolver.of(room.doc) if stored.anchor else None))

    # -- HTTP --------------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/rooms/{room:path}/chat", self.http_history, methods=["GET"]),
            Route("/api/users/{user}/mentions", self.http_mentions, methods=["GET"]),
            Route("/api/users/{user}/mentions/read", self.http_mark_read, methods=["POST"]),
        ]

    def _identify(self, request: Request, room: str | None) -> Identity:
        token, _ = token_from(request)
        secret = self.settings.secret
        if room is not None:
            return authenticate(secret, token, room, request.query_params.get("name"))
        if secret is None:
            return dev_identity(request.query_params.get("name"))
        if not token:
            raise AccessDenied("token required", UNAUTHORIZED)
        return verify_token(secret, token)

    async def http_history(self, request: Request) -> Response:
        name = request.path_params["room"]
        try:
            self._identify(request, name)
        except AccessDenied as denied:
            return _json({"error": denied.reason}, 401 if denied.code == UNAUTHORIZED else 403)
        try:
            before = _optional_id(request.query_params.get("before") or None, "before")
            limit = self._limit(_int_param(request, "limit"))
        except Refused as refused:
            return _json({"error": refused.message}, 400)
        store = self._store()
        try:
            rows = await store.chat_history(name, before=before, limit=limit + 1)
            has_more = len(rows) > limit
            rows = rows[-limit:] if has_more else rows
            resolver = await self._resolver(name) if any(m.anchor for m in rows) else None
        except Exception:  # noqa: BLE001 - logged; the client sees a plain 503
            log.exception("chat history request failed", room=name)
            return _json({"error": "storage unavailable"}, 503)
        messages = [render(m, resolver) for m in rows]
        body: dict[str, Any] = {"room": name, "messages": messages, "has_more": has_more,
                                "next_before": messages[0]["id"] if has_more and messages else None}
        return _json(body)

    async def http_mentions(self, request: Request) -> Response:
        user = request.path_params["user"]
        try:
            identity = self._identify(request, None)
        except AccessDenied as denied:
            return _json({"error": denied.reason}, 401)
        if self.settings.secret is not None and identity.user_id != user:
            return _json({"error": "you may only list your own mentions"}, 403)
        unread_only = request.query_params.get("all", "") not in ("1", "true", "yes")
        try:
            before = _optional_id(request.query_params.get("before") or None, "before")
            limit = self._limit(_int_param(request, "limit"))
        except Refused as refused:
            return _json({"error": refused.message}, 400)
        try:
            rows = await self._store().chat_mentions(user, unread_only=unread_only, before=before, limit=limit)
        except Exception:  # noqa: BLE001
            log.exception("mentions request failed")
            return _json({"error": "storage unavailable"}, 503)
        mentions = [{"room": m.message.room, "read": m.read, "message": render(m.message, None)}
                    for m in rows if identity.allows(m.message.room)]
        return _json({"user": user, "mentions": mentions})

    async def http_mark_read(self, request: Request) -> Response:
        user = request.path_params["user"]
        try:
            body = await request.json()
            room, upto = body["room"], _required_id(body.get("upto"), "upto")
            if not isinstance(room, str) or not room:
                raise Refused("bad-request", "room must be a string")
        except (ValueError, KeyError, TypeError, Refused):
            return _json({"error": 'body must be {"room": str, "upto": message id}'}, 400)
        try:
            identity = self._identify(request, room)
        except AccessDenied as denied:
            return _json({"error": denied.reason}, 401 if denied.code == UNAUTHORIZED else 403)
        if self.settings.secret is not None and identity.user_id != user:
            return _json({"error": "you may only mark your own mentions"}, 403)
        try:
            marked = await self._store().chat_mark_read(user, room, upto)
        except Exception:  # noqa: BLE001
            log.exception("marking mentions read failed")
            return _json({"error": "storage unavailable"}, 503)
        return _json({"marked": marked})

    def _store(self) -> Any:
        assert self._hub is not None
        return self._hub.store

    async def _resolver(self, name: str) -> Resolver:
        """Against the live room if loaded here, else against the stored document (read-only)."""
        assert self._hub is not None
        room = self._hub.rooms.get(name)
        if room is not None:
            return Resolver.of(room.doc)
        state = await self._hub.store.load(name)
        doc = pycrdt.Doc()
        if state.snapshot:
            doc.apply_update(state.snapshot)
        for update in state.updates:
            doc.apply_update(update)
        return Resolver.of(doc)


def _valid_request_id(value: Any) -> bool:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return True
    return isinstance(value, str) and len(value) <= MAX_REQUEST_ID_CHARS


def _required_id(value: Any, what: str = "message_id") -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS or "\0" in value:
        raise Refused("bad-request", f"{what} must be a message id")
    return value


def _optional_id(value: Any, what: str) -> str | None:
    return None if value is None else _required_id(value, what)


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise Refused("bad-request", f"{name} must be an integer") from None


def _error(request_id: Any, ref: str, code: str, message: str, **extra: Any) -> bytes:
    return protocol.encode_extension({"type": "error", "id": request_id, "ref": ref, "code": code,
                                      "message": message, **extra})


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})
