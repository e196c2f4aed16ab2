"""Room chat for the Python SDK.

    room = await client.join("notes/a")
    room.chat = RoomChat(room)                       # (the SDK attaches it on join)
    sent = await room.chat.send("see here @bob", anchor=room.chat.anchor(text, 6, 11))
    page = await room.chat.history(limit=50)         # newest 50, oldest first
    older = await room.chat.history(before=page.messages[0].id)
    async for event in room.chat.events():           # live: message / updated / deleted
        ...

``RoomChat`` only needs a room object with ``await room.request(body) -> reply`` (raising the
SDK's ``RequestFailed`` for ``{"type": "error"}`` replies) and ``room.on(type, callback)`` for
pushes; it turns refusals into ``ChatRefused`` (``TooLong``, ``RateLimited``, ``ChatForbidden``,
``NotFound``) with the server's ``code``. Wire format: README "Chat".
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pycrdt

__all__ = ["Author", "ChatEvent", "ChatForbidden", "ChatMessage", "ChatPage", "ChatRefused", "NotFound",
           "RateLimited", "RoomChat", "TooLong", "anchor_range"]


class ChatRefused(Exception):
    """The server refused a chat request; ``code`` is the server's error code."""

    def __init__(self, code: str, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.body = body or {}


class TooLong(ChatRefused):
    """``too-long``: over the server's ``chat_max_chars``."""


class RateLimited(ChatRefused):
    """``rate-limited``: over the per-user rate; ``retry_after`` seconds is a good pause."""

    @property
    def retry_after(self) -> float:
        return float(self.body.get("retry_after", 1.0))


class ChatForbidden(ChatRefused):
    """``forbidden``: e.g. editing someone else's message."""


class NotFound(ChatRefused):
    """``not-found``: no such message in this room (or it was deleted)."""


_REFUSALS: dict[str, type[ChatRefused]] = {
    "too-long": TooLong, "rate-limited": RateLimited, "forbidden": ChatForbidden, "not-found": NotFound,
}


@dataclass(frozen=True, slots=True)
class Author:
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    id: str
    author: Author
    text: str
    ts: float
    anchor: dict[str, Any] | None = None  # {"start", "end", "from", "to", "type"} (offsets resolved by the server)
    reply_to: str | None = None
    edited_ts: float | None = None
    deleted: bool = False
    mentions: tuple[str, ...] = ()
    reactions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    room: str = ""

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ChatMessage:
        author = body.get("author") or {}
        return cls(
            id=str(body["id"]), author=Author(str(author.get("id", "")), str(author.get("name", ""))),
            text=str(body.get("text", "")), ts=float(body.get("ts", 0.0)), anchor=body.get("anchor"),
            reply_to=body.get("reply_to"), edited_ts=body.get("edited_ts"), deleted=bool(body.get("deleted")),
            mentions=tuple(body.get("mentions") or ()),
            reactions={k: tuple(v) for k, v in (body.get("reactions") or {}).items()}, room=str(body.get("room", "")),
        )


@dataclass(frozen=True, slots=True)
class ChatPage:
    messages: list[ChatMessage]
    has_more: bool

    def __iter__(self) -> Any:
        return iter(self.messages)

    def __len__(self) -> int:
        return len(self.messages)


@dataclass(frozen=True, slots=True)
class ChatEvent:
    kind: str  # "message" | "updated" | "deleted"
    message: ChatMessage


def anchor_range(text: pycrdt.Text, start: int, end: int) -> dict[str, Any]:
    """A Yjs relative-position range over ``text[start:end]`` that follows concurrent edits:
    the start sticks to the character after it, the end to the character before it."""
    return {"start": text.sticky_index(start, pycrdt.Assoc.AFTER).to_json(),
            "end": text.sticky_index(end, pycrdt.Assoc.BEFORE).to_json()}


class RoomChat:
    """The chat of one joined room."""

    def __init__(self, room: Any, *, timeout: float = 10.0) -> None:
        self.room = room
        self.timeout = timeout
        self.latest: ChatPage | None = None  # the history pushed on (re)join
        self._callbacks: list[Callable[[ChatEvent], Any]] = []
        self._queues: set[asyncio.Queue[ChatEvent]] = set()
        self._joined = asyncio.Event()
        self._unsubscribe = [
            room.on("chat.message", lambda body: self._event("message", body)),
            room.on("chat.updated", lambda body: self._event("updated", body)),
            room.on("chat.deleted", lambda body: self._event("deleted", body)),
            room.on("chat.history", self._pushed_history),
        ]

    # -- requests --------------------------------------------------------------------------------

    async def send(self, text: str, anchor: dict[str, Any] | None = None, reply_to: str | None = None) -> ChatMessage:
        body: dict[str, Any] = {"type": "chat.send", "text": text}
        if anchor is not None:
            body["anchor"] = anchor
        if reply_to is not None:
            body["reply_to"] = reply_to
        return ChatMessage.from_body((await self._request(body))["message"])

    async def edit(self, message_id: str, text: str) -> ChatMessage:
        reply = await self._request({"type": "chat.edit", "message_id": message_id, "text": text})
        return ChatMessage.from_body(reply["message"])

    async def delete(self, message_id: str) -> ChatMessage:
        reply = await self._request({"type": "chat.delete", "message_id": message_id})
        return ChatMessage.from_body(reply["message"])

    async def react(self, message_id: str, emoji: str) -> ChatMessage:
        """Toggle this user's ``emoji`` reaction."""
        reply = await self._request({"type": "chat.react", "message_id": message_id, "emoji": emoji})
        return ChatMessage.from_body(reply["message"])

    async def history(self, limit: int = 50, before: str | None = None) -> ChatPage:
        """The newest ``limit`` messages older than ``before`` (a message id), oldest first."""
        body: dict[str, Any] = {"type": "chat.history", "limit": limit}
        if before is not None:
            body["before"] = before
        reply = await self._request(body)
        return ChatPage([ChatMessage.from_body(m) for m in reply.get("messages", [])], bool(reply.get("has_more")))

    async def mark_read(self, upto: str) -> int:
        """Mark this user's mentions in this room up to message ``upto`` read."""
        return int((await self._request({"type": "chat.read", "upto": upto})).get("marked", 0))

    def anchor(self, text: pycrdt.Text, start: int, end: int) -> dict[str, Any]:
        return anchor_range(text, start, end)

    def typing(self, active: bool) -> None:
        """Typing indicator: a field of this client's presence (ephemeral, never stored)."""
        presence = getattr(self.room, "presence", None)
        if presence is None:
            return
        state = dict(presence.state or {})
        state["chat"] = {**(state.get("chat") or {}), "typing": bool(active)}
        presence.set(state)

    async def _request(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.room.request(body, timeout=self.timeout)
        except Exception as exc:
            error_body = getattr(exc, "body", None)
            if isinstance(error_body, dict) and error_body.get("type") == "error":
                code = str(error_body.get("code", "error"))
                raise _REFUSALS.get(code, ChatRefused)(code, str(error_body.get("message", "")), error_body) from exc
            raise

    # -- live ------------------------------------------------------------------------------------

    def on_event(self, callback: Callable[[ChatEvent], Any]) -> Callable[[], None]:
        """Call ``callback(event)`` (sync or async) for every live message, edit and deletion."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    async def events(self) -> AsyncIterator[ChatEvent]:
        """Every live event from now on (your own messages included), as an async iterator."""
        queue: asyncio.Queue[ChatEvent] = asyncio.Queue()
        self._queues.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.discard(queue)

    async def wait_joined(self, timeout: float | None = 10.0) -> ChatPage:
        """The history the server pushes on join (the newest messages)."""
        async with asyncio.timeout(timeout):
            await self._joined.wait()
        assert self.latest is not None
        return self.latest

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()

    def _pushed_history(self, body: dict[str, Any]) -> None:
        self.latest = ChatPage([ChatMessage.from_body(m) for m in body.get("messages", [])],
                               bool(body.get("has_more")))
        self._joined.set()

    def _event(self, kind: str, body: dict[str, Any]) -> None:
        try:
            event = ChatEvent(kind, ChatMessage.from_body(body["message"]))
        except (KeyError, TypeError, ValueError):
            return
        for callback in list(self._callbacks):
            result = callback(event)
            if inspect.isawaitable(result):
                asyncio.ensure_future(result)
        for queue in self._queues:
            queue.put_nowait(event)
