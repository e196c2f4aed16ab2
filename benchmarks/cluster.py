"""Cross-node latency: the core hub's typing load with each room's clients split over 2 nodes.

    python -m benchmarks.cluster [--rooms 50] [--clients-per-room 4] [--rate 2] [--duration 20]

Starts a private redis-server and two `collab serve` nodes sharing one SQLite file, then:
1. single node: every client on node A (the baseline);
2. two nodes: clients 0,1 of each room on node A, 2,3 on node B.
Every client types at ``--rate`` updates/s (prebuilt pycrdt updates). Receivers match relayed update
bytes (the server relays them unchanged) to their send time, so latency is sender → receiver.
In run 2 each delivery is classed as same-node or cross-node. Redis messages per update come from
the nodes' `collab_bus_published_total`. Writes benchmarks/results/cluster.md and cluster.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pycrdt
from websockets.asyncio.client import connect

from collab import protocol

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(url, timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(url)


async def metric(port: int, name: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def prebuilt_updates(n: int, tag: str) -> list[bytes]:
    doc = pycrdt.Doc()
    text = doc.get("text", type=pycrdt.Text)
    out: list[bytes] = []
    doc.observe(lambda e: out.append(bytes(e.update)))
    for i in range(n):
        text.insert(len(text), f"{tag}:{i};")
    return out


class Client:
    def __init__(self, url: str, node: str) -> None:
        self.url = url
        self.node = node
        self.ws = None
        self.task: asyncio.Task | None = None

    async def start(self, on_frame) -> None:
        self.ws = await connect(self.url, compression=None, ping_interval=None, max_size=None)
        await self.ws.send(protocol.encode_sync_step1(b"\x00"))
        self.task = asyncio.create_task(self._read(on_frame))

    async def _read(self, on_frame) -> None:
        try:
            async for frame in self.ws:
                if isinstance(frame, bytes) and frame[:2] == b"\x00\x02":
                    on_frame(self, frame)
        except Exception:  # noqa: BLE001 - the run is over
            pass

    async def close(self) -> None:
        await self.ws.close()
        if self.task:
            await asyncio.gather(self.task, return_exceptions=True)


async def run_load(urls: list[str], rooms: int, per_room: int, rate: float, duration: float,
                   label: str) -> dict:
    sent: dict[bytes, tuple[float, str]] = {}
    same: list[float] = []
    cross: list[float] = []

    def on_frame(client: Client, frame: bytes) -> None:
        now = time.perf_counter()
        entry = sent.get(frame)
        if entry is not None:
            (same if entry[1] == client.node else cross).append((now - entry[0]) * 1000)

    prefix = f"cluster-{random.getrandbits(32):08x}"
    clients: list[list[Client]] = []
    for r in range(rooms):
        row = []
        for c in range(per_room):
            node = 0 if len(urls) == 1 or c < per_room // 2 else 1
            row.append(Client(f"{urls[node]}/{prefix}-{r}", f"n{node}"))
        clients.append(row)
    flat = [c for row in clients for c in row]
    for i in range(0, len(flat), 50):
        await asyncio.gather(*(c.start(on_frame) for c in flat[i:i + 50]))
    n_updates = int(rate * duration) + 1
    plans = [(c, prebuilt_updates(n_updates, f"{label}{id(c)}")) for c in flat]
    frames = [(c, [protocol.encode_update(u) for u in ups]) for c, ups in plans]
    await asyncio.sleep(1.0)  # let every join settle before the clock starts

    async def typist(client: Client, own: list[bytes]) -> None:
        interval = 1.0 / rate
        start = time.perf_counter() + random.random() * interval
        for i, frame in enumerate(own):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.perf_counter() - start > duration:
                return
            sent[frame] = (time.perf_counter(), client.node)
            await client.ws.send(frame)

    began = time.perf_counter()
    await asyncio.gather(*(typist(c, f) for c, f in frames))
    elapsed = time.perf_counter() - began
    await asyncio.sleep(2.0)  # drain window
    await asyncio.gather(*(c.close() for c in flat))
    expected = len(sent) * (per_room - 1)

    def summary(xs: list[float]) -> dict:
        if not xs:
            return {"n": 0}
        xs = sorted(xs)
        return {"n": len(xs), "p50_ms": round(statistics.median(xs), 2),
                "p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))], 2), "max_ms": round(xs[-1], 2)}

    return {"label": label, "updates": len(sent), "updates_per_s": round(len(sent) / elapsed, 1),
            "deliveries": len(same) + len(cross), "expected_deliveries": expected,
            "same_node": summary(same), "cross_node": summary(cross)}


async def main(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="collab-cluster-"))
    redis_port = free_port()
    redis = await asyncio.create_subprocess_exec(
        shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    ports = [free_port(), free_port()]
    nodes = []
    try:
        for i, port in enumerate(ports):
            nodes.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "collab", "serve", "--port", str(port), "--store", str(work / "shared.db"),
                "--redis", f"redis://127.0.0.1:{redis_port}/0", "--log-level", "warning", "--log-format", "json",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env={**os.environ}))
        for port in ports:
            await wait_http(f"http://127.0.0.1:{port}/healthz")
        urls = [f"ws://127.0.0.1:{p}" for p in ports]
        single = await run_load(urls[:1], args.rooms, args.clients_per_room, args.rate, args.duration, "single")
        before = sum([await metric(p, "collab_bus_published_total") for p in ports])
        split = await run_load(urls, args.rooms, args.clients_per_room, args.rate, args.duration, "split")
        after = sum([await metric(p, "collab_bus_published_total") for p in ports])
        split["bus_messages_per_update"] = round((after - before) / max(1, split["updates"]), 2)
        return {"machine": {"nproc": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                "config": vars(args), "single_node": single, "two_nodes": split}
    finally:
        for proc in [*nodes, redis]:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*nodes, redis]:
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def render(result: dict) -> str:
    s, t = result["single_node"], result["two_nodes"]
    c = result["config"]
    lines = [
        "# Cross-node latency (`python -m benchmarks.cluster`)", "",
        f"{result['machine']['date']}, {result['machine']['nproc']} cores. {c['rooms']} rooms × "
        f"{c['clients_per_room']} clients, each typing {c['rate']} updates/s for {c['duration']} s; "
        "two `collab serve` nodes on one shared SQLite file (synchronous=FULL) and one redis-server, all on loopback.", "",
        "| setup | updates/s | deliveries | p50 | p99 | max |", "|---|---:|---:|---:|---:|---:|",
        f"| one node | {s['updates_per_s']} | {s['deliveries']}/{s['expected_deliveries']} | "
        f"{s['same_node']['p50_ms']} ms | {s['same_node']['p99_ms']} ms | {s['same_node']['max_ms']} ms |",
        f"| two nodes, receiver on the sender's node | {t['updates_per_s']} | {t['same_node']['n']} | "
        f"{t['same_node'].get('p50_ms')} ms | {t['same_node'].get('p99_ms')} ms | {t['same_node'].get('max_ms')} ms |",
        f"| two nodes, receiver on the other node | | {t['cross_node']['n']} | "
        f"{t['cross_node'].get('p50_ms')} ms | {t['cross_node'].get('p99_ms')} ms | {t['cross_node'].get('max_ms')} ms |",
        "", f"Redis messages published per update (two nodes): {t['bus_messages_per_update']} "
        f"(deliveries {t['deliveries']}/{t['expected_deliveries']}).", ""]
    return "\n".join(lines)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rooms", type=int, default=50)
    parser.add_argument("--clients-per-room", type=int, default=4)
    parser.add_argument("--rate", type=float, default=2.0, help="updates per second per client")
    parser.add_argument("--duration", type=float, default=20.0)
    args = parser.parse_args()
    result = asyncio.run(main(args))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cluster.jsonl").write_text(json.dumps(result) + "\n")
    text = render(result)
    (RESULTS / "cluster.md").write_text(text)
    print(text)


if __name__ == "__main__":
    cli()
