"""The workspace feed: subscribers (websocket or SSE) that hear join / leave / idle / active.

Each subscriber has a prefix, the identity it connected with (it only hears rooms its token
allows) and a bounded queue. Events are encoded once and shared by every subscriber that wants
them. A subscriber whose queue fills is closed with 1013 (SSE: the stream ends) instead of
growing memory; it reconnects and starts again from a snapshot. A subscriber whose token expires
is closed with 4401, like a document socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from collab import closecodes
from collab.auth import Identity
from presence.registry import Event

KEEPALIVE_SECONDS = 15.0  # SSE comment lines: proxies close streams that stay silent


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


class Feed:
    """One subscriber: a prefix, an identity, a bounded queue of (type, JSON text)."""

    def __init__(self, prefix: str, identity: Identity, limit: int) -> None:
        self.prefix = prefix
        self.identity = identity
        self.limit = limit
        self.queue: deque[tuple[str, str]] = deque()
        self.wake = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.gone = False  # the client went away: nothing more to send, not even a close

    def wants(self, room: str) -> bool:
        return room.startswith(self.prefix) and self.identity.allows(room)

    def push(self, kind: str, text: str) -> None:
        if self.done:
            return
        if len(self.queue) >= self.limit:
            self.queue.clear()
            self.close(closecodes.TRY_AGAIN_LATER, "slow consumer")
            return
        self.queue.append((kind, text))
        self.wake.set()

    def close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self.wake.set()

    def leave(self) -> None:
        self.gone = True
        self.wake.set()

    @property
    def done(self) -> bool:
        return self.gone or self.close_code is not None

    async def wait(self, keepalive: float) -> bool:
        """Wait for something to send; False after ``keepalive`` seconds of nothing."""
        expires = self.identity.expires_at
        timeout = keepalive if expires is None else min(keepalive, expires - time.time())
        if timeout <= 0:
            self.close(closecodes.UNAUTHORIZED, "token expired")
            return True
        self.wake.clear()
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
        except TimeoutError:
            return False
        return True


class Feeds:
    def __init__(self, max_feeds: int, queue: int, on_change: Callable[[], None] = lambda: None) -> None:
        self.max_feeds = max_feeds
        self.queue = queue
        self.subscribers: set[Feed] = set()
        self._on_change = on_change

    def __len__(self) -> int:
        return len(self.subscribers)

    def admit(self, prefix: str, identity: Identity, snapshot: dict[str, Any]) -> Feed | None:
        if len(self.subscribers) >= self.max_feeds:
            return None
        feed = Feed(prefix, identity, self.queue)
        feed.push("snapshot", dumps(snapshot))
        self.subscribers.add(feed)
        self._on_change()
        return feed

    def forget(self, feed: Feed) -> None:
        self.subscribers.discard(feed)
        self._on_change()

    def close_all(self, code: int, reason: str) -> None:
        for feed in list(self.subscribers):
            feed.close(code, reason)

    def emit(self, events: list[Event]) -> None:
        if not events or not self.subscribers:
            return
        at = time.time()
        for event in events:
            text = None
            for feed in list(self.subscribers):
                if feed.wants(event.room):
                    text = text or dumps(event.public(at))
                    feed.push(event.kind, text)

    async def serve_socket(self, ws: WebSocket, feed: Feed) -> None:
        """Send ``feed`` as JSON text frames until it closes or the client goes away."""
        reader = asyncio.create_task(self._read(ws, feed))
        try:
            while not feed.gone:
                while feed.queue and not feed.gone:
                    await ws.send_text(feed.queue.popleft()[1])
                if feed.done:
                    break
                await feed.wait(60.0)
        except (WebSocketDisconnect, OSError, RuntimeError):
            feed.leave()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.forget(feed)
        if not feed.gone and feed.close_code is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(feed.close_code, feed.close_reason), 3)

    @staticmethod
    async def _read(ws: WebSocket, feed: Feed) -> None:
        """Read (and ignore) what the client sends; answer pings; notice when it goes away."""
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                feed.leave()
                return
            if message.get("text") == '{"type":"ping"}':
                feed.push("pong", '{"type":"pong"}')

    async def stream(self, feed: Feed) -> AsyncIterator[str]:
        """Server-sent events: ``event: <type>`` + ``data: <json>``; ends when the feed closes."""
        try:
            while True:
                while feed.queue:
                    kind, text = feed.queue.popleft()
                    yield f"event: {kind}\ndata: {text}\n\n"
                if feed.done:
                    return
                if not await feed.wait(KEEPALIVE_SECONDS):
                    yield ": keepalive\n\n"
        finally:
            self.forget(feed)
