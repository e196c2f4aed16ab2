"""Drive real, stock Yjs clients (Node `yjs` + `y-websocket`) from Python tests.

    async with NodeYjs() as node:
        a = await node.client(url, "room")          # waits until synced
        await a.insert(0, "hi")
        b = await node.client(url, "room")
        await b.wait_text("hi")

One `NodeYjs` is one Node process (tests/node/driver.mjs) hosting any number of clients;
`await node.kill()` SIGKILLs it, dropping all its sockets without close frames.
`ReferenceServer` runs the reference Node server (@y/websocket-server) on a free port.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import inspect
import itertools
import json
import os
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Literal

NODE_DIR = Path(__file__).resolve().parent / "node"
DRIVER = NODE_DIR / "driver.mjs"
REFERENCE_SERVER = NODE_DIR / "node_modules" / "@y" / "websocket-server" / "src" / "server.js"
_STAMP = NODE_DIR / "node_modules" / ".stamp-collab-installed"
_LINE_LIMIT = 256 * 1024 * 1024  # base64 document updates travel as single lines


class NodeError(RuntimeError):
    """The driver answered with an error, or died."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_node_modules() -> None:
    """Install tests/node dependencies if node_modules is missing or older than the lock file."""
    lock = NODE_DIR / "package-lock.json"
    manifest = NODE_DIR / "package.json"

    def fresh() -> bool:
        if not _STAMP.exists():
            return False
        sources = [p.stat().st_mtime for p in (lock, manifest) if p.exists()]
        return _STAMP.stat().st_mtime >= max(sources)

    if fresh():
        return
    with open(NODE_DIR / ".stamp-npm-lock", "w") as guard:  # serialise parallel test workers
        fcntl.flock(guard, fcntl.LOCK_EX)
        if fresh():
            return
        cmd = ["npm", "ci"] if lock.exists() else ["npm", "install"]
        done = subprocess.run(
            [*cmd, "--no-audit", "--no-fund"], cwd=NODE_DIR,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed in {NODE_DIR}:\n{done.stderr}")
        _STAMP.touch()


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
                     what: str = "condition") -> Any:
    """Poll a sync or async predicate until truthy; return its value, or TimeoutError after
    ``timeout`` seconds. (Every test helper's way to wait; ``servers`` re-exports it.)"""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(interval)


async def _drain(stream: asyncio.StreamReader | None, sink: deque[str]) -> None:
    if stream is None:
        return
    while line := await stream.readline():
        sink.append(line.decode(errors="replace").rstrip())


class NodeYjs:
    """One Node driver process managing many y-websocket clients."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = env
        self._proc: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._names = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Condition()
        self.events: list[dict[str, Any]] = []
        self.stderr_tail: deque[str] = deque(maxlen=200)
        self.pid: int | None = None

    async def __aenter__(self) -> NodeYjs:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        await asyncio.to_thread(ensure_node_modules)
        self._proc = await asyncio.create_subprocess_exec(
            "node", str(DRIVER), cwd=NODE_DIR, limit=_LINE_LIMIT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, **(self._env or {})},
        )
        self.pid = self._proc.pid
        self._tasks = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(_drain(self._proc.stderr, self.stderr_tail)),
        ]
        await self.wait_event("ready", timeout=15)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            while line := await self._proc.stdout.readline():
                try:
                    msg = json.loads(line)
                except ValueError:
                    self.stderr_tail.append("stdout: " + line.decode(errors="replace").rstrip())
                    continue
                if "event" in msg:
                    async with self._changed:
                        self.events.append(msg)
                        self._changed.notify_all()
                    continue
                fut = self._pending.pop(msg.get("id"), None)
                if fut is None or fut.done():
                    continue
                if msg.get("ok"):
                    fut.set_result(msg.get("result"))
                else:
                    fut.set_exception(NodeError(msg.get("error", "unknown error")))
        finally:
            err = NodeError("node driver exited; stderr tail:\n" + "\n".join(self.stderr_tail))
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self._pending.clear()
            async with self._changed:
                self._changed.notify_all()

    async def request(self, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
        """Send one command to the driver and return its result (NodeError on error)."""
        if not self.alive:
            raise NodeError("node driver is not running")
        assert self._proc is not None and self._proc.stdin is not None
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._proc.stdin.write(json.dumps({"id": rid, "cmd": cmd, **args}).encode() + b"\n")
        try:
            await self._proc.stdin.drain()
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    async def wait_event(
        self,
        kind: str,
        client: str | None = None,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 10.0,
        since: int = 0,
    ) -> dict[str, Any]:
        """Wait for an event line `kind` (optionally of `client`, matching `predicate`) at index >= since."""

        def find() -> dict[str, Any] | None:
            for ev in self.events[since:]:
                if ev["event"] == kind and (client is None or ev.get("client") == client) and (
                    predicate is None or predicate(ev)
                ):
                    return ev
            if not self.alive and self._tasks and self._tasks[0].done():
                raise NodeError(f"node driver exited while waiting for {kind!r}")
            return None

        async with self._changed:
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(lambda: find() is not None)
            except TimeoutError:
                raise TimeoutError(f"no {kind!r} event for {client!r} within {timeout} s") from None
        ev = find()
        assert ev is not None
        return ev

    async def client(
        self,
        url: str,
        room: str,
        *,
        params: Mapping[str, str] | None = None,
        awareness: Mapping[str, Any] | None | Literal[False] = None,
        connect: bool = True,
        wait_synced: bool = True,
        timeout: float = 10.0,
        name: str | None = None,
    ) -> YjsClient:
        """Create a Y.Doc + WebsocketProvider(url, room). `awareness`: None keeps the stock initial
        local state `{}`, a dict sets it, False sets it to null (client announces nothing)."""
        name = name or f"c{next(self._names)}"
        args: dict[str, Any] = {"client": name, "url": url, "room": room, "connect": connect}
        if params is not None:
            args["params"] = dict(params)
        if awareness is False:
            args["awareness"] = None
        elif awareness is not None:
            args["awareness"] = dict(awareness)
        result = await self.request("open", **args)
        c = YjsClient(self, name, int(result["client_id"]), result["url"])
        if connect and wait_synced:
            await c.wait_synced(timeout)
        return c

    async def kill(self) -> None:
        """SIGKILL the Node process: every client's socket drops without a close frame."""
        if self.alive:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGKILL)
        await self._reap()

    async def close(self) -> None:
        """Graceful stop: closing stdin makes the driver destroy its providers and exit."""
        if self.alive:
            assert self._proc is not None and self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                await asyncio.wait_for(self._proc.wait(), 5)
            except TimeoutError:
                self._proc.kill()
        await self._reap()

    async def _reap(self) -> None:
        if self._proc is not None:
            await self._proc.wait()
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, 5)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()


class YjsClient:
    """A y-websocket client living in a NodeYjs process. Text/map names default to 'text'/'map'."""

    def __init__(self, node: NodeYjs, name: str, client_id: int, url: str) -> None:
        self.node = node
        self.name = name
        self.id = client_id  # doc.clientID
        self.url = url  # full websocket URL incl. room and params

    def __repr__(self) -> str:
        return f"YjsClient({self.name!r}, id={self.id}, url={self.url!r})"

    async def _call(self, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
        return await self.node.request(cmd, timeout=timeout, client=self.name, **args)

    # --- document ---
    async def insert(self, index: int | None, text: str, name: str = "text") -> int:
        """Insert at index (None = end); returns the new length."""
        return await self._call("insert", index=index, text=text, name=name)

    async def append(self, text: str, name: str = "text") -> int:
        return await self.insert(None, text, name)

    async def delete(self, index: int, length: int, name: str = "text") -> int:
        return await self._call("delete", index=index, length=length, name=name)

    async def text(self, name: str = "text") -> str:
        return await self._call("text", name=name)

    async def map_set(self, key: str, value: Any, name: str = "map") -> None:
        await self._call("map_set", key=key, value=value, name=name)

    async def map_get(self, key: str | None = None, name: str = "map") -> Any:
        """Value of `key` (None if absent), or the whole map as a dict when key is None."""
        args = {"name": name} if key is None else {"name": name, "key": key}
        return await self._call("map_get", **args)

    async def state_vector(self) -> bytes:
        return base64.b64decode(await self._call("state_vector"))

    async def update(self) -> bytes:
        """Y.encodeStateAsUpdate(doc)."""
        return base64.b64decode(await self._call("update"))

    async def apply_update(self, update: bytes) -> None:
        await self._call("apply_update", update_b64=base64.b64encode(update).decode())

    async def type_burst(
        self, n: int, interval_ms: float = 10, alphabet: str | None = None, name: str = "text"
    ) -> str:
        """Append n characters one by one at a fixed pace; returns what was typed."""
        budget = n * interval_ms / 1000 + 10
        args: dict[str, Any] = {"n": n, "interval_ms": interval_ms, "name": name}
        if alphabet:
            args["alphabet"] = alphabet
        return (await self._call("type_burst", timeout=budget, **args))["typed"]

    # --- awareness ---
    async def set_awareness(self, state: Mapping[str, Any] | None) -> None:
        """setLocalState(state); None removes this client's state."""
        await self._call("set_awareness", state=None if state is None else dict(state))

    async def awareness(self) -> dict[int, Any]:
        """All awareness states this client knows (its own included), keyed by clientID."""
        return {int(k): v for k, v in (await self._call("awareness")).items()}

    async def client_id(self) -> int:
        return await self._call("client_id")

    # --- connection ---
    async def wait_synced(self, timeout: float = 10.0) -> None:
        """Until provider.synced; NodeError at once if the server closed with a 4400-4499 code."""
        await self._call("wait_synced", timeout=timeout + 5, timeout_ms=int(timeout * 1000))

    async def disconnect(self) -> None:
        await self._call("disconnect")

    async def connect(self) -> None:
        await self._call("connect")

    async def destroy(self) -> None:
        await self._call("destroy")

    async def set_params(self, params: Mapping[str, str]) -> None:
        """URL params used by the next (re)connection, e.g. a new token."""
        await self._call("set_params", params=dict(params))

    async def status(self) -> dict[str, Any]:
        """{connected, connecting, synced, should_connect, url, closes}."""
        return await self._call("status")

    async def closes(self) -> list[dict[str, Any]]:
        """Every connection-close so far: {code, reason, local}; local closes have code None."""
        return (await self.status())["closes"]

    # --- waiting ---
    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [
            e for e in self.node.events
            if e.get("client") == self.name and (kind is None or e["event"] == kind)
        ]

    async def wait_event(
        self,
        kind: str,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 10.0,
        since: int = 0,
    ) -> dict[str, Any]:
        """Wait for an event of this client: 'status', 'sync', 'connection-close', 'closed'
        (server close code 4400-4499: no reconnect), 'connection-error', 'permission-denied'.
        `since` is an index into node.events (use len(node.events) before acting)."""
        return await self.node.wait_event(kind, self.name, predicate, timeout, since)

    async def wait_for(
        self,
        predicate: Callable[[], Any] | Callable[[], Awaitable[Any]],
        timeout: float = 10.0,
        interval: float = 0.02,
        what: str = "condition",
    ) -> Any:
        """Poll a sync or async predicate until truthy; returns its value."""
        return await wait_until(predicate, timeout, interval, what)

    async def wait_text(self, expected: str, timeout: float = 10.0, name: str = "text") -> str:
        last: list[str] = [""]

        async def check() -> bool:
            last[0] = await self.text(name)
            return last[0] == expected

        try:
            await wait_until(check, timeout, 0.02, "text")
        except TimeoutError:
            raise TimeoutError(f"{self.name}: text {last[0]!r} != {expected!r} after {timeout} s") from None
        return last[0]


class ReferenceServer:
    """The reference Node server (@y/websocket-server) on a free 127.0.0.1 port.

    `stop()` and `start()` may be called again to restart it on the same port."""

    def __init__(self, port: int | None = None, env: Mapping[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self._env = env
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self.output: deque[str] = deque(maxlen=200)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def __aenter__(self) -> ReferenceServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, timeout: float = 10.0) -> None:
        await asyncio.to_thread(ensure_node_modules)
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), **(self._env or {})}
        self._proc = await asyncio.create_subprocess_exec(
            "node", str(REFERENCE_SERVER), cwd=NODE_DIR, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        self._drain = asyncio.create_task(_drain(self._proc.stdout, self.output))

        async def accepting() -> bool:
            if self._proc is None or self._proc.returncode is not None:
                raise RuntimeError("reference server exited:\n" + "\n".join(self.output))
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.close()
            await writer.wait_closed()
            return True

        await wait_until(accepting, timeout, 0.05, f"reference server on port {self.port}")

    async def stop(self, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL) the server and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._drain is not None:
            await self._drain
