"""A y-websocket client that keeps a pycrdt Doc in sync with a room.

Speaks the stock y-websocket protocol, so it works against this server and any compatible
one (the load harness uses it to measure peers too). Local edits made to ``client.doc`` are sent
as updates; remote ones are applied. Awareness: ``set_awareness`` and ``awareness_states``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

import pycrdt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from collab import protocol
from collab.protocol import AwarenessEntry


class ClosedError(ConnectionError):
    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed with {code}: {reason}")
        self.code = code
        self.reason = reason


def room_url(base: str, room: str, params: dict[str, str] | None = None) -> str:
    url = base.rstrip("/") + "/" + quote(room, safe="/")
    if params:
        url += "?" + urlencode(params)
    return url


class YClient:
    def __init__(self, url: str, room: str, *, token: str | None = None, params: dict[str, str] | None = None,
                 doc: pycrdt.Doc | None = None, max_size: int | None = 64 * 1024 * 1024,
                 on_update: Callable[[bytes], None] | None = None) -> None:
        query = dict(params or {})
        if token:
            query["token"] = token
        self.url = room_url(url, room, query)
        self.room = room
        self.doc = doc or pycrdt.Doc()
        self.synced = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.permission_denied: str | None = None
        self.awareness_states: dict[int, Any] = {}
        self.awareness_clocks: dict[int, int] = {}
        self.frames_received = 0
        self.on_update = on_update
        self._max_size = max_size
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._applying = False
        self._local_clock = 0
        self._subscription = self.doc.observe(self._on_local_change)

    # -- lifecycle -----------------------------------------------------------------------------

    async def connect(self, *, wait_synced: bool = True, timeout: float = 10.0) -> YClient:
        self._ws = await connect(self.url, max_size=self._max_size, compression=None, open_timeout=timeout,
                                 ping_interval=None)
        self._reader = asyncio.create_task(self._read_loop())
        await self._send(protocol.encode_sync_step1(self.doc.get_state()))
        if wait_synced:
            await self.wait_synced(timeout)
        return self

    async def wait_synced(self, timeout: float = 10.0) -> None:
        done, _ = await asyncio.wait(
            [asyncio.ensure_future(self.synced.wait()), asyncio.ensure_future(self.closed.wait())],
            timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for fut in _:
            fut.cancel()
        if self.synced.is_set():
            return
        if self.closed.is_set():
            raise ClosedError(self.close_code, self.close_reason)
        raise TimeoutError("not synced in time")

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        with contextlib.suppress(Exception):
            self.doc.unobserve(self._subscription)

    async def __aenter__(self) -> YClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_closed(self, timeout: float = 10.0) -> tuple[int | None, str]:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code, self.close_reason

    # -- sending -------------------------------------------------------------------------------

    @property
    def ws(self) -> ClientConnection:
        assert self._ws is not None, "not connected"
        return self._ws

    async def _send(self, frame: bytes) -> None:
        await self.ws.send(frame)

    async def send_raw(self, frame: bytes | str) -> None:
        """Send an arbitrary frame (tests use this to play a hostile client)."""
        await self.ws.send(frame)

    def _on_local_change(self, event: Any) -> None:
        if self._applying or self._ws is None:
            return
        frame = protocol.encode_update(bytes(event.update))
        asyncio.get_running_loop().create_task(self._send_quietly(frame))

    async def _send_quietly(self, frame: bytes) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(frame)

    async def send_update(self, update: bytes) -> None:
        await self._send(protocol.encode_update(update))

    async def set_awareness(self, state: Any) -> None:
        self._local_clock += 1
        entry = AwarenessEntry(self.doc.client_id, self._local_clock, json.dumps(state))
        await self._send(protocol.encode_awareness([entry]))

    # -- receiving -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        ws = self.ws
        try:
            async for frame in ws:
                if isinstance(frame, str):
                    continue
                self.frames_received += 1
                self._handle(frame)
        except ConnectionClosed:
            pass
        finally:
            rcvd = ws.protocol.close_rcvd
            self.close_code = rcvd.code if rcvd is not None else None
            self.close_reason = rcvd.reason if rcvd is not None else ""
            self.closed.set()

    def _apply(self, update: bytes) -> None:
        self._applying = True
        try:
            self.doc.apply_update(update)
        finally:
            self._applying = False

    def _handle(self, frame: bytes) -> None:
        msg_type, pos = protocol.read_var_uint(frame, 0)
        if msg_type == protocol.MSG_SYNC:
            sub, pos = protocol.read_var_uint(frame, pos)
            payload, _ = protocol.read_var_bytes(frame, pos)
            if sub == protocol.SYNC_STEP1:
                reply = protocol.encode_sync_step2(self.doc.get_update(payload))
                asyncio.get_running_loop().create_task(self._send_quietly(reply))
            elif sub == protocol.SYNC_STEP2:
                self._apply(payload)
                self.synced.set()
            elif sub == protocol.SYNC_UPDATE:
                self._apply(payload)
                if self.on_update is not None:
                    self.on_update(payload)
        elif msg_type == protocol.MSG_AWARENESS:
            payload, _ = protocol.read_var_bytes(frame, pos)
            count, p = protocol.read_var_uint(payload, 0)
            for _ in range(count):
                cid, p = protocol.read_var_uint(payload, p)
                clock, p = protocol.read_var_uint(payload, p)
                state, p = protocol.read_var_string(payload, p)
                if state == "null":
                    self.awareness_states.pop(cid, None)
                else:
                    self.awareness_states[cid] = json.loads(state)
                self.awareness_clocks[cid] = clock
        elif msg_type == protocol.MSG_AUTH:
            _denied, p = protocol.read_var_uint(frame, pos)
            self.permission_denied, _ = protocol.read_var_string(frame, p)

    # -- helpers for tests and benchmarks --------------------------------------------------------

    def text(self, name: str = "text") -> str:
        return str(self.doc.get(name, type=pycrdt.Text))

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await asyncio.sleep(0.01)
