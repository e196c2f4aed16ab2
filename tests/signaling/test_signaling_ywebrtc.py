"""Stock y-webrtc clients (Node: yjs + y-webrtc + simple-peer, WebRTC from @roamhq/wrtc) sync a
document through our /signaling endpoint, on one node and across two nodes.

Network safety: libwebrtc gathers host candidates on every interface it can see, so the Node peers
run inside a network namespace this test creates (``unshare -n``) that has nothing but ``lo``:
every ICE candidate and every media/data packet stays inside it. The peers reach the signaling
server through a unix socket (``ws+unix:``) that the test forwards to the server's 127.0.0.1 port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clients.rtc import SignalingClient
from collab.auth import issue_token
from servers import InProcessServer
from yjs import NODE_DIR

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "ywebrtc_peer.mjs"
SECRET = "signaling-secret-0123456789-abcdefghij"


@pytest.fixture
async def netns():
    """A network namespace with only loopback, kept alive by a holder process; yields its pid."""
    if not (shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip")):
        pytest.skip("unshare/nsenter/ip not available: cannot isolate Node WebRTC peers")
    holder = await asyncio.create_subprocess_exec(
        "unshare", "-n", "sh", "-c", "ip link set lo up && echo ready && exec sleep 600",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(holder.stdout.readline(), 10)
    except TimeoutError:
        line = b""
    if line.strip() != b"ready":
        err = (await holder.stderr.read()).decode(errors="replace") if holder.returncode is not None else ""
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
        await holder.wait()
        pytest.skip(f"cannot create a network namespace here: {err.strip()[:200]}")
    try:
        yield holder.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
        await holder.wait()


@contextlib.asynccontextmanager
async def unix_forwarder(path: Path, port: int):
    """Accept on a unix socket, pipe every connection to 127.0.0.1:port."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    tasks: set[asyncio.Task[Any]] = set()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", port)
        both = [asyncio.create_task(pipe(client_r, server_w)), asyncio.create_task(pipe(server_r, client_w))]
        tasks.update(both)
        await asyncio.gather(*both, return_exceptions=True)

    server = await asyncio.start_unix_server(handle, path=str(path))
    try:
        yield path
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class YWebrtcPeer:
    """A Node process with one stock WebrtcProvider, living in the test's network namespace."""

    def __init__(self, ns_pid: int, url: str, room: str, argv: list[str] | None = None) -> None:
        command = argv or ["node", str(PEER_SCRIPT), str(NODE_DIR / "node_modules"), url, room]
        self.argv = ["nsenter", "-t", str(ns_pid), "-n", *command]
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self.changed = asyncio.Condition()
        self.proc: asyncio.subprocess.Process | None = None
        self.peer_id = ""

    async def start(self) -> YWebrtcPeer:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, cwd=NODE_DIR, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._drain_stderr())]
        self.peer_id = (await self.wait("ready"))["peerId"]
        return self

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        while line := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError):
                async with self.changed:
                    self.events.append(json.loads(line))
                    self.changed.notify_all()
        await self.proc.wait()
        async with self.changed:
            self.changed.notify_all()

    async def _drain_stderr(self) -> None:
        assert self.proc and self.proc.stderr
        while line := await self.proc.stderr.readline():
            self.stderr.append(line.decode(errors="replace").rstrip())

    async def wait(self, event: str, predicate: Callable[[dict[str, Any]], bool] | None = None,
                   timeout: float = 20.0) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for ev in self.events:
                if ev.get("event") == event and (predicate is None or predicate(ev)):
                    return ev
            if self.proc is not None and self.proc.returncode is not None:
                raise RuntimeError("y-webrtc peer exited:\n" + "\n".join(self.stderr[-30:]))
            return None

        async with self.changed:
            try:
                async with asyncio.timeout(timeout):
                    await self.changed.wait_for(lambda: find() is not None)
            except TimeoutError:
                raise TimeoutError(f"no {event!r} within {timeout} s; stderr:\n" + "\n".join(self.stderr[-30:])) from None
        return find()  # type: ignore[return-value]

    async def send(self, **cmd: Any) -> None:
        assert self.proc and self.proc.stdin
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        await self.proc.stdin.drain()

    async def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.send(cmd="exit")
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)


async def sync_two_ywebrtc_peers(ns_pid: int, url_a: str, url_b: str, room: str, observer: SignalingClient) -> float:
    a = await YWebrtcPeer(ns_pid, url_a, room).start()
    b = None
    try:
        started = time.perf_counter()
        b = await YWebrtcPeer(ns_pid, url_b, room).start()
        await a.wait("peers", lambda ev: b.peer_id in ev["webrtcPeers"])
        await b.wait("peers", lambda ev: a.peer_id in ev["webrtcPeers"])
        await a.wait("synced", lambda ev: ev["synced"])
        await b.wait("synced", lambda ev: ev["synced"])
        seconds = time.perf_counter() - started
        await a.send(cmd="insert", index=0, text="hello from A")
        await b.wait("text", lambda ev: ev["text"] == "hello from A")
        await b.send(cmd="insert", text=", hi from B")
        await a.wait("text", lambda ev: ev["text"] == "hello from A, hi from B")
        # Whatever crossed the signaling server had y-webrtc's shapes; the document itself did not
        # (the server only relays signaling: the text went over the WebRTC data channel).
        seen: list[dict[str, Any]] = []
        while not observer.messages.empty():
            seen.append(observer.messages.get_nowait())
        datas = [m["data"] for m in seen if m.get("type") == "publish" and m.get("topic") == room]
        assert all(isinstance(m.get("clients"), int) and m["clients"] >= 2 for m in seen if m.get("type") == "publish")
        announces = {d["from"] for d in datas if d.get("type") == "announce"}
        assert {a.peer_id, b.peer_id} <= announces
        signals = [d for d in datas if d.get("type") == "signal"]
        kinds = {d["signal"].get("type") for d in signals}
        assert {"offer", "answer"} <= kinds, kinds
        assert all({"from", "to", "token", "signal"} <= set(d) for d in signals)
        for d in signals:
            if d["signal"].get("type") == "candidate":
                assert {"candidate", "sdpMLineIndex", "sdpMid"} <= set(d["signal"]["candidate"])
                # the namespace has nothing but lo: every candidate is a loopback address
                assert d["signal"]["candidate"]["candidate"].split()[4] in ("127.0.0.1", "::1")
        assert "hello from A" not in json.dumps(datas)
        return seconds
    finally:
        await a.close()
        if b is not None:
            await b.close()


async def test_stock_ywebrtc_peers_sync_a_document_through_one_node(tmp_path, netns):
    async with InProcessServer(tmp_path, secret=SECRET) as srv, unix_forwarder(tmp_path / "sig.sock", srv.port) as sock:
        token = issue_token(SECRET, user="webrtc", rooms=["doc-*"])
        url = f"ws+unix:{sock}:/signaling?token={token}"
        observer = await SignalingClient(srv.url + "/signaling", token).connect()
        await observer.subscribe("doc-1")
        await observer.ping()
        await observer.next(lambda m: m["type"] == "pong")
        seconds = await sync_two_ywebrtc_peers(netns, url, url, "doc-1", observer)
        print(f"\ny-webrtc peers connected + synced in {seconds * 1000:.0f} ms (one node)")
        await observer.close()


async def test_stock_ywebrtc_peers_on_different_nodes(tmp_path, netns):
    from collab.bus import LocalNetwork

    network = LocalNetwork()
    async with (InProcessServer(tmp_path, network=network) as n1, InProcessServer(tmp_path, network=network) as n2,
                unix_forwarder(tmp_path / "n1.sock", n1.port) as s1, unix_forwarder(tmp_path / "n2.sock", n2.port) as s2):
        observer = await SignalingClient(n1.url + "/signaling").connect()
        await observer.subscribe("doc-x")
        await observer.ping()
        await observer.next(lambda m: m["type"] == "pong")
        seconds = await sync_two_ywebrtc_peers(netns, f"ws+unix:{s1}:/signaling", f"ws+unix:{s2}:/signaling",
                                               "doc-x", observer)
        print(f"\ny-webrtc peers connected + synced in {seconds * 1000:.0f} ms (two nodes)")
        await observer.close()


@pytest.mark.parametrize("python_first", [False, True], ids=["ywebrtc-offers", "python-offers"])
async def test_python_helper_links_with_a_stock_ywebrtc_peer(tmp_path, netns, python_first):
    """clients.rtc speaks y-webrtc's announce/signal shapes well enough for simple-peer: either side
    may offer (simple-peer trickles its candidates; aiortc puts them in the SDP), and the data
    channel carries y-webrtc's opening sync step 1."""
    import sys

    async with InProcessServer(tmp_path) as srv, unix_forwarder(tmp_path / "sig.sock", srv.port) as sock:
        python = YWebrtcPeer(netns, "", "", argv=[sys.executable, str(HERE / "rtc_interop_peer.py"), str(sock),
                                                  "mixed", "20"])
        node = YWebrtcPeer(netns, f"ws+unix:{sock}:/signaling", "mixed")
        first, second = (python, node) if python_first else (node, python)
        try:
            await first.start()
            await second.start()
            linked = await python.wait("linked")
            await node.wait("peers", lambda ev: python.peer_id in ev["webrtcPeers"])
            assert linked["remote"] == node.peer_id
            assert linked["initiator"] is python_first  # the first one there hears the announce and offers
            assert linked["first"].startswith("0000")  # y-protocols messageSync, sync step 1
            print(f"\nPython <-> y-webrtc data channel open after {linked['ms']} ms")
        finally:
            await python.close()
            await node.close()
