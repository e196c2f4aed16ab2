"""Presence relay cost: frames and server CPU per cursor move, with and without coalescing.

    python -m benchmarks.presence_bench            # full run (10/100/300 clients), ~2 minutes
    python -m benchmarks.presence_bench --quick    # 10/100 clients, short windows

N raw websocket clients join one room and each moves its cursor ``--rate`` times per second (an
awareness update with a new clock and a new y-codemirror-style cursor). The server runs in its own
process with the presence coalescing window off (``flush_ms=0``: every change is relayed at once,
the y-websocket reference behaviour) and on. Measured over a fixed window, from the server's
``/metrics`` and ``/proc/<pid>/stat``:

* moves/s          awareness changes the server accepted (``collab_presence_changes_total``)
* frames/move      awareness frames queued to clients per accepted change (``collab_presence_frames_total``)
* KiB out/move     websocket payload bytes sent per change (``collab_bytes_out_total``)
* CPU µs/move      server process CPU time (user+system) per change
* CPU %            server CPU over the window (100 % = one core)
* closes           clients the server closed (slow consumer: its outbox overflowed)

The clients count received bytes without parsing them and do not echo, so the load generator
stays cheap; stock Yjs clients also echo what they apply (dropped by the server as stale), which
adds input work not measured here. Results: ``benchmarks/results/presence.md``.

A second, in-process table compares the two ways of not sending a member its own entries back:
one shared frame per flush (members ignore their own equal-clock entry) versus one frame per
member without its own entry.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import httpx

from collab import protocol
from collab.protocol import AwarenessEntry

RESULTS = Path(__file__).resolve().parent / "results" / "presence.md"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the server under test (its own process) ----------------------------------------------------

def serve(port: int, flush_ms: float, data_dir: str) -> None:
    import uvicorn

    from collab.app import create_app
    from collab.logs import configure
    from collab.settings import load_settings
    from collab.wsfast import uvicorn_ws
    from presence import PresenceService, PresenceSettings

    settings = load_settings({"port": str(port), "store": str(Path(data_dir) / "bench.db"), "log_level": "warning",
                              "log_format": "json", "rate_limit": "100000", "rate_burst": "100000"}, environ={})
    configure(settings.log_format, settings.log_level)
    presence = PresenceService(PresenceSettings.from_settings(settings, flush_ms=flush_ms))
    app = create_app(settings, services=[presence])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, host="127.0.0.1", port=port, ws=uvicorn_ws(settings.ws_impl), lifespan="on", log_config=None,
                access_log=False, ws_per_message_deflate=False, ws_ping_interval=None, loop="auto")


class Server:
    def __init__(self, flush_ms: float, data_dir: str) -> None:
        self.flush_ms = flush_ms
        self.data_dir = data_dir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        self.proc = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-m", "benchmarks.presence_bench", "--serve", str(self.port), str(self.flush_ms),
             self.data_dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient() as client:
            while True:
                try:
                    if (await client.get(self.http + "/healthz", timeout=1)).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("benchmark server did not start")
                await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, 15)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime

    async def metrics(self) -> dict[str, float]:
        async with httpx.AsyncClient() as client:
            text = (await client.get(self.http + "/metrics", timeout=60)).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line:
                continue
            key, value = line.rsplit(" ", 1)
            name = key.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
        return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a cheap websocket client: masks what it sends, counts what it receives ----------------------

def _masked(payload: bytes) -> bytes:
    n = len(payload)
    head = bytes((0x82,)) + (bytes((0x80 | n,)) if n < 126 else bytes((0x80 | 126,)) + struct.pack("!H", n))
    key = os.urandom(4)
    reps = (key * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "little") ^ int.from_bytes(reps, "little")).to_bytes(n, "little")
    return head + key + body


class Client(asyncio.Protocol):
    def __init__(self, path: str, client_id: int) -> None:
        self.path = path
        self.client_id = client_id
        self.clock = 0
        self.transport: asyncio.Transport | None = None
        self.open = asyncio.get_running_loop().create_future()
        self.bytes_in = 0
        self.lost = False
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write((f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"  # type: ignore[attr-defined]
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        if not self.open.done():
            self._head += data
            if b"\r\n\r\n" in self._head:
                self.open.set_result(b" 101 " in self._head.split(b"\r\n", 1)[0] + b" ")
            return
        self.bytes_in += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.open.done():
            self.open.set_result(False)

    def move(self, position: int) -> None:
        self.clock += 1
        rel = {"type": None, "tname": "text", "item": {"client": 1, "clock": position}, "assoc": 0}
        state = json.dumps({"user": {"name": f"bench {self.client_id}"}, "cursor": {"anchor": rel, "head": rel}},
                           separators=(",", ":"))
        frame = protocol.encode_awareness([AwarenessEntry(self.client_id, self.clock, state)])
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_masked(frame))


@dataclass
class Row:
    clients: int
    flush_ms: float
    moves_per_s: float
    frames_per_move: float
    kib_out_per_move: float
    cpu_us_per_move: float
    cpu_percent: float
    loadgen_percent: float
    closes: int
    machine_percent: float


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, kernel work (loopback TCP) included."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def idle_cpu_rate(server: Server, seconds: float = 2.0) -> float:
    """The server's CPU use with nobody connected (janitor, tickers), subtracted from every row."""
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    await asyncio.sleep(seconds)
    return (server.cpu_seconds() - cpu0) / (time.perf_counter() - t0)


async def measure(server: Server, clients: int, rate: float, warmup: float, window: float,
                  idle: float = 0.0) -> Row:
    loop = asyncio.get_running_loop()
    room = f"bench/{clients}-{int(time.time() * 1000)}"
    conns: list[Client] = []
    for i in range(clients):
        _, conn = await loop.create_connection(lambda i=i: Client(f"/{room}", 1_000_000 + i), "127.0.0.1", server.port)
        if not await conn.open:
            raise RuntimeError("websocket handshake refused")
        conns.append(conn)
    stop = asyncio.Event()

    async def mover(conn: Client, phase: float) -> None:
        period = 1.0 / rate
        start = loop.time() + phase * period
        n = 0
        while not stop.is_set():
            delay = start + n * period - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            conn.move(n)
            n += 1

    tasks = [asyncio.create_task(mover(c, i / clients)) for i, c in enumerate(conns)]
    await asyncio.sleep(warmup)
    # Each counter snapshot is taken when /metrics is served; time and CPU are read right after.
    before = await server.metrics()
    cpu0, t0, gen0, mach0 = server.cpu_seconds(), time.perf_counter(), own_cpu(), machine_busy()
    await asyncio.sleep(window)
    after = await server.metrics()
    cpu1, t1, gen1, mach1 = server.cpu_seconds(), time.perf_counter(), own_cpu(), machine_busy()
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    moves = max(delta("collab_presence_changes_total"), 1.0)
    elapsed = t1 - t0
    busy = max(0.0, cpu1 - cpu0 - idle * elapsed)
    await server.metrics()  # answered once the server has worked through the departures
    return Row(clients=clients, flush_ms=server.flush_ms, moves_per_s=moves / elapsed,
               frames_per_move=delta("collab_presence_frames_total") / moves,
               kib_out_per_move=delta("collab_bytes_out_total") / moves / 1024,
               cpu_us_per_move=busy / moves * 1e6, cpu_percent=(cpu1 - cpu0) / elapsed * 100,
               loadgen_percent=(gen1 - gen0) / elapsed * 100, closes=int(delta("collab_closes_total")),
               machine_percent=(mach1[0] - mach0[0]) / max(1, mach1[1] - mach0[1]) * 100)


# -- in-process: shared frame vs one frame per member without its own entry ----------------------

def _shared_frames(entries: list[AwarenessEntry], chunk: int) -> int:
    """One encoding per flush, the same bytes queued to every member; returns bytes queued."""
    frames = [protocol.encode_awareness(entries[i:i + chunk]) for i in range(0, len(entries), chunk)]
    return sum(len(f) for f in frames) * len(entries)


def _per_member_frames(entries: list[AwarenessEntry], chunk: int) -> int:
    """One encoding per member, leaving its own entry out; returns bytes queued."""
    total = 0
    for me in range(len(entries)):
        mine = entries[:me] + entries[me + 1:]
        total += sum(len(protocol.encode_awareness(mine[i:i + chunk])) for i in range(0, len(mine), chunk))
    return total


def exclusion_costs(sizes: list[int], chunk: int = 64) -> list[tuple[int, float, float, float, float]]:
    state = json.dumps({"user": {"id": "u", "name": "User", "color": "#336699"},
                        "cursor": {"anchor": {"tname": "text", "item": {"client": 1, "clock": 5}, "assoc": 0},
                                   "head": {"tname": "text", "item": {"client": 1, "clock": 9}, "assoc": 0}}})
    rows = []
    for n in sizes:
        entries = [AwarenessEntry(1_000_000 + i, 7, state) for i in range(n)]
        timings = []
        for fn in (_shared_frames, _per_member_frames):
            reps = max(1, 2000 // n)
            started = time.perf_counter()
            for _ in range(reps):
                queued = fn(entries, chunk)
            timings.append(((time.perf_counter() - started) / reps * 1e6, queued))
        (t_shared, b_shared), (t_member, b_member) = timings
        rows.append((n, t_shared, t_member, b_shared / 1024, b_member / 1024))
    return rows


# -- report ------------------------------------------------------------------------------------

def render(rows: list[Row], excl: list[tuple[int, float, float, float, float]], args: argparse.Namespace,
           elapsed: float) -> str:
    lines = [
        "# Presence relay: frames and CPU per cursor move",
        "",
        (f"`python -m benchmarks.presence_bench{' --quick' if args.quick else ''}` — "
         f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} CPUs, Python "
         f"{platform.python_version()}; each client moves its cursor {args.rate:g}×/s; {args.window:g} s window "
         f"after {args.warmup:g} s warm-up; load generator and server share the machine (so does anything else "
         f"running on it: see *machine busy*). Run took {elapsed:.0f} s."),
        "",
        ("| clients | flush ms | moves/s offered | moves/s accepted | frames/move | KiB out/move "
         "| server CPU µs/move | server CPU % | load gen CPU % | machine busy % | closes |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.clients} | {r.flush_ms:g} | {r.clients * args.rate:,.0f} | {r.moves_per_s:,.0f} | "
                     f"{r.frames_per_move:,.2f} | {r.kib_out_per_move:,.2f} | {r.cpu_us_per_move:,.0f} | "
                     f"{r.cpu_percent:,.0f} | {r.loadgen_percent:,.0f} | {r.machine_percent:,.0f} | {r.closes} |")
    lines += [
        "",
        "frames/move without coalescing is N−1 (every change goes to every other member at once); with it, each",
        "member gets one frame per window holding every change of that window, so frames/move ≈ N / (changes per",
        "window). The bytes per move stay about the same — every member still needs every cursor — but the",
        "per-frame costs (framing, syscalls, the writer's wake-ups) are paid once per window instead of once per",
        "change. Moves/s below N × rate means the server could not keep up.",
        "",
        "## Not sending members their own entries (in-process, one flush where all N clients changed)",
        "",
        "| clients | shared frame µs | per-member frames µs | shared KiB queued | per-member KiB queued |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n, ts, tm, bs, bm in excl:
        lines.append(f"| {n} | {ts:,.0f} | {tm:,.0f} | {bs:,.0f} | {bm:,.0f} |")
    lines += [
        "",
        "A shared frame is encoded once and queued to every member as the same bytes object; members ignore",
        "their own entry (its clock equals theirs). Per-member frames save one entry per member on the wire",
        "but cost N encodings per flush and N distinct buffers in memory. The server uses the shared frame,",
        "and skips the one member whose entries are the only ones in a batch (the common case of one person",
        "moving).",
        "",
    ]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> str:
    sizes = [10, 100] if args.quick else [10, 100, 300]
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="presence-bench-") as tmp:
        for flush_ms in (0.0, args.flush_ms):
            async with Server(flush_ms, tmp) as server:
                idle = await idle_cpu_rate(server)
                for n in sizes:
                    row = await measure(server, n, args.rate, args.warmup, args.window, idle)
                    rows.append(row)
                    print(f"[{time.perf_counter() - started:5.1f} s] clients={n} flush_ms={flush_ms:g}: "
                          f"{row.frames_per_move:.2f} frames/move, {row.cpu_us_per_move:.0f} µs CPU/move, "
                          f"{row.moves_per_s:.0f} moves/s, server {row.cpu_percent:.0f}% / "
                          f"load generator {row.loadgen_percent:.0f}% CPU, machine {row.machine_percent:.0f}% busy",
                          flush=True)
    excl = exclusion_costs(sizes)
    return render(rows, excl, args, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.presence_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--serve", nargs=3, metavar=("PORT", "FLUSH_MS", "DATA_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="10 and 100 clients, short windows")
    parser.add_argument("--rate", type=float, default=5.0, help="cursor moves per second per client")
    parser.add_argument("--flush-ms", type=float, default=50.0, help="the coalescing window to compare with 0")
    parser.add_argument("--window", type=float, default=None, help="measured seconds per configuration")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before measuring")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.serve:
        port, flush_ms, data_dir = args.serve
        serve(int(port), float(flush_ms), data_dir)
        return 0
    args.window = args.window or (3.0 if args.quick else 6.0)
    args.warmup = args.warmup or (1.0 if args.quick else 1.5)
    try:
        import uvloop
    except ImportError:
        report = asyncio.run(run(args))
    else:
        report = uvloop.run(run(args))  # a cheaper load generator leaves more of the machine to the server
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
