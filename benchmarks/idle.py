"""Memory per idle connection and per loaded room, measured on the server process (RSS by pid).

Phases (RSS is the median of several samples after the server settles):

0. baseline — the server after one warm-up connection came and went;
1. rooms    — ``rooms`` rooms, each joined by one client that sends one small document
              (``doc_chars`` characters): RSS grows by rooms × (room + document + 1 connection);
2. idle     — the remaining connections join those rooms and stay idle (they answer pings and
              sync; y-websocket clients send nothing else when nobody types).

per connection = (RSS2 − RSS1) / (connections − rooms)
per room       = (RSS1 − RSS0) / rooms − per connection
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from benchmarks import wsraw, ywire
from benchmarks.servers import rss_bytes
from benchmarks.stats import finite, percentiles


class _Idle:
    def __init__(self) -> None:
        self.synced = 0
        self.frames = 0

    def on_message(self, conn: wsraw.RawConnection, msg: bytes) -> None:
        self.frames += 1
        if len(msg) >= 2 and msg[0] == ywire.MSG_SYNC:
            if msg[1] == ywire.SYNC_STEP1:
                conn.write(_step2())
            elif msg[1] == ywire.SYNC_STEP2 and conn.tag is None:
                conn.tag = True
                self.synced += 1


_STEP2: bytes | None = None


def _step2() -> bytes:
    global _STEP2
    if _STEP2 is None:
        _STEP2 = wsraw.client_frame(ywire.STEP2_EMPTY)
    return _STEP2


async def _settled_rss(pid: int, settle: float, samples: int = 5) -> int:
    await asyncio.sleep(settle)
    values = []
    for _ in range(samples):
        values.append(rss_bytes(pid))
        await asyncio.sleep(0.2)
    return int(statistics.median(values))


async def idle(url: str, server_pid: int, *, connections: int = 10_000, per_room: int = 10,
               doc_chars: int = 1000, concurrency: int = 200, settle: float = 2.0, room_prefix: str | None = None,
               log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, Any]:
    from benchmarks.servers import raise_fd_limit

    raise_fd_limit(connections * 2 + 1000)
    rooms = max(1, connections // max(1, per_room))
    prefix = room_prefix or f"idle-{random.getrandbits(32):08x}"
    host = url.split("//", 1)[-1].split(":", 1)[0]
    spread = 64 if host.startswith("127.") else 0
    state = _Idle()
    conns: list[wsraw.RawConnection] = []
    errors: Counter[str] = Counter()
    connect_s: list[float] = []

    # 0: baseline after a warm-up connection (imports, first room, allocator arenas)
    warm = await wsraw.connect(url, f"{prefix}-warmup", on_message=state.on_message)
    warm.write(wsraw.client_frame(ywire.STEP1_EMPTY))
    await asyncio.sleep(0.3)
    await warm.close()
    rss0 = await _settled_rss(server_pid, settle)
    log(f"idle: baseline RSS {rss0 / 2**20:.1f} MiB; opening {rooms:,} rooms with one {doc_chars}-character document each…")

    sem = asyncio.Semaphore(concurrency)
    appender_seed = random.getrandbits(24) << 7

    async def open_one(index: int, room: int, with_doc: bool) -> None:
        async with sem:
            t0 = time.perf_counter()
            try:
                conn = await wsraw.connect(url, f"{prefix}-{room}", on_message=state.on_message,
                                           local_host=wsraw.local_host_for(index, spread), timeout=60)
            except (OSError, ConnectionError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1
                return
            connect_s.append(time.perf_counter() - t0)
            conn.tag = None
            conn.write(wsraw.client_frame(ywire.STEP1_EMPTY))
            if with_doc:
                text = ("lorem ipsum dolor sit amet " * (doc_chars // 27 + 1))[:doc_chars]
                update, _ = ywire.TextAppender(appender_seed + room + 1).append(text)
                conn.write(wsraw.client_frame(ywire.update_message(update)))
            conns.append(conn)

    started = time.perf_counter()
    await asyncio.gather(*(open_one(r, r, True) for r in range(rooms)))
    await _wait_synced(state, len(conns), 30)
    rss1 = await _settled_rss(server_pid, settle)
    log(f"  {len(conns):,} rooms: RSS {rss1 / 2**20:.1f} MiB; adding {connections - rooms:,} idle connections…")
    await asyncio.gather(*(open_one(i, i % rooms, False) for i in range(rooms, connections)))
    wall = time.perf_counter() - started
    await _wait_synced(state, len(conns), 60)
    rss2 = await _settled_rss(server_pid, settle + 1.0)
    closed_early = Counter(str(c.close_code) for c in conns if c.transport is None)
    opened = len(conns)
    extra = max(1, opened - rooms)
    per_conn = (rss2 - rss1) / extra
    per_room = (rss1 - rss0) / rooms - per_conn
    log(f"  {opened:,} connections ({state.synced:,} synced): RSS {rss2 / 2**20:.1f} MiB → "
        f"{per_conn / 1024:.1f} KiB per idle connection, {per_room / 1024:.1f} KiB per loaded room"
        + (f"; errors {dict(errors)}" if errors else "") + (f"; closed {dict(closed_early)}" if closed_early else ""))
    for conn in conns:  # RST: no TIME_WAIT left behind for the next benchmark
        conn.abort()
    await asyncio.sleep(0.2)
    cs = percentiles(connect_s, qs=(50, 99))
    return {
        "kind": "idle", "url": url, "connections": connections, "opened": opened, "synced": state.synced,
        "rooms": rooms, "doc_chars": doc_chars,
        "rss_baseline_mb": round(rss0 / 2**20, 1), "rss_rooms_mb": round(rss1 / 2**20, 1),
        "rss_all_mb": round(rss2 / 2**20, 1),
        "per_connection_kb": round(per_conn / 1024, 2), "per_room_kb": round(per_room / 1024, 2),
        "connect_ms": {k: finite(v) for k, v in cs.items()},
        "connections_per_s": round(opened / wall, 1) if wall > 0 else None,
        "errors": dict(errors), "closed": dict(closed_early),
    }


async def _wait_synced(state: _Idle, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while state.synced < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
