"""Append throughput of a store under many concurrent appenders (a script, not collected).

    python tests/storage/bench_store.py postgresql://postgres@127.0.0.1:5432/test --appenders 200 --rooms 1
    python tests/storage/bench_store.py sqlite:///tmp/bench.db --appenders 200 --rooms 50

Each appender awaits one append at a time (like a room committing a client's update) in a closed
loop for ``--seconds``. PostgreSQL runs in a fresh schema (``bench_<random>``, dropped afterwards).
Reports appends/s, average batch size (appended / commits) and append latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time

import pycrdt

from storage import open_store


def sample_update(n: int) -> bytes:
    doc = pycrdt.Doc()
    doc.get("t", type=pycrdt.Text).insert(0, f"<w{n}:typed a few characters>")
    return doc.get_update()


async def run(url: str, appenders: int, rooms: int, seconds: float, shared: str | None) -> None:
    schema = None
    if url.startswith(("postgresql:", "postgres:")):
        schema = shared or f"bench_{secrets.token_hex(4)}"
        url += ("&" if "?" in url else "?") + f"schema={schema}"
        if shared:
            schema = None  # several bench processes share it: the caller drops it
    store = open_store(url)
    await store.open()
    updates = [sample_update(n) for n in range(appenders)]
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def appender(n: int) -> None:
        room = f"room-{n % rooms}"
        while time.monotonic() < stop:
            started = time.perf_counter()
            await store.append(room, updates[n], author=f"user{n}")
            latencies.append(time.perf_counter() - started)

    try:
        await asyncio.gather(*(appender(n) for n in range(appenders)))  # warm-up: connections
        latencies.clear()
        commits0, appended0 = store.commits, store.appended
        stop = time.monotonic() + seconds
        began = time.perf_counter()
        await asyncio.gather(*(appender(n) for n in range(appenders)))
        elapsed = time.perf_counter() - began
        commits, appended = store.commits - commits0, store.appended - appended0
        q = statistics.quantiles(latencies, n=100)
        print(
            f"{url.split('?')[0]} appenders={appenders} rooms={rooms}: "
            f"{appended / elapsed:,.0f} appends/s, {commits / elapsed:,.0f} commits/s, "
            f"avg batch {appended / max(commits, 1):.1f}, "
            f"latency p50 {q[49] * 1000:.1f} ms p99 {q[98] * 1000:.1f} ms"
        )
    finally:
        if schema is not None and hasattr(store, "_pool") and store._pool is not None:
            async with store._pool.acquire() as conn:
                await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--appenders", type=int, default=200)
    parser.add_argument("--rooms", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--schema", help="PostgreSQL: share this schema with other bench processes")
    args = parser.parse_args()
    asyncio.run(run(args.url, args.appenders, args.rooms, args.seconds, args.schema))


if __name__ == "__main__":
    main()
