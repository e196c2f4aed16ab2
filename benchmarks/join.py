"""Join time: how long a new client waits for a document with a long history.

* warm — the room is loaded (another client keeps it open): connect, send step 1, receive step 2;
* cold — right after a server restart, so the first join loads the room from storage.

A join is timed from the start of the TCP connect until the whole step 2 (the document) has
arrived; applying it in the client is reported separately (``client_apply_ms``) because it is the
client's cost, not the server's. The document is checked against the expected text.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import pycrdt

from benchmarks import wsraw, ywire
from benchmarks.replay import join_once
from benchmarks.servers import BenchServer


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(values) * 1000, 2), "min": round(min(values) * 1000, 2),
            "max": round(max(values) * 1000, 2)}


async def join_times(url: str, room: str, *, server: BenchServer | None = None, expected: str | None = None,
                     warm: int = 5, cold: int = 3,
                     log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Warm joins (room held open by another client) and, with a restartable ``server``, cold joins."""
    result: dict[str, Any] = {"kind": "join", "url": url, "room": room}
    cold_s: list[float] = []
    ok = True
    size = None
    if server is not None and cold > 0:
        for i in range(cold):
            await server.restart()
            payload, seconds = await join_once(url, room)
            cold_s.append(seconds)
            size = len(payload)
            if i == 0 and expected is not None:
                ok &= _text(payload) == expected
            log(f"  cold join {i + 1}/{cold}: {seconds * 1000:.1f} ms ({len(payload):,} bytes)")
    # warm: keep the room loaded with a holder connection
    holder = await wsraw.connect(url, room)
    holder.write(wsraw.client_frame(ywire.STEP1_EMPTY))
    await asyncio.sleep(0.5)
    warm_s: list[float] = []
    apply_s: list[float] = []
    try:
        for _ in range(warm + 1):
            payload, seconds = await join_once(url, room)
            warm_s.append(seconds)
            size = len(payload)
            t0 = time.perf_counter()
            text = _text(payload)
            apply_s.append(time.perf_counter() - t0)
            if expected is not None:
                ok &= text == expected
        warm_s = warm_s[1:]  # the first warm join may still pay for the holder's load
        log(f"  warm join: median {statistics.median(warm_s) * 1000:.1f} ms over {len(warm_s)} joins")
    finally:
        await holder.close()
    result.update({
        "document_bytes": size, "warm_ms": _stats(warm_s), "cold_ms": _stats(cold_s),
        "client_apply_ms": _stats(apply_s), "text_ok": ok if expected is not None else None,
        "warm_joins": len(warm_s), "cold_joins": len(cold_s),
    })
    if cold_s and warm_s:
        result["cold_over_warm"] = round(statistics.median(cold_s) / statistics.median(warm_s), 2)
    return result


def _text(update: bytes) -> str:
    doc = pycrdt.Doc()
    doc.apply_update(update)
    return str(doc.get("text", type=pycrdt.Text))


def populate_pycrdt_store(db_path: str, room: str, updates: list[bytes], checkpoint_interval: int = 100) -> int:
    """Write ``updates`` into a pycrdt-store SQLite database exactly as ``SQLiteYStore.write`` would
    have left it after receiving them one by one: one ``yupdates`` row per update, and the
    checkpoint its write path takes every ``checkpoint_interval`` writes (state *before* that write,
    timestamped between the two). The schema must exist (``benchmarks.pycrdt_server.init_db``).
    pycrdt-websocket names a room by the request path, so ``room`` is stored as ``/room``.
    Returns the number of rows. Used because its own write path (one commit per update) needs
    many minutes for a 260k-update history."""
    import sqlite3

    path = "/" + room.lstrip("/")
    base = time.time() - len(updates) * 1e-3
    doc = pycrdt.Doc()
    rows = []
    checkpoint: tuple[bytes, float] | None = None
    for i, update in enumerate(updates, start=1):
        ts = base + i * 1e-3
        if i % checkpoint_interval == 0:
            checkpoint = (doc.get_update(), ts - 0.5e-3)
        doc.apply_update(update)
        rows.append((path, update, b"", ts))
    db = sqlite3.connect(db_path)
    try:
        with db:
            db.executemany("INSERT INTO yupdates VALUES (?, ?, ?, ?)", rows)
            if checkpoint is not None:
                db.execute("INSERT OR REPLACE INTO ycheckpoints (path, checkpoint, timestamp) VALUES (?, ?, ?)",
                           (path, checkpoint[0], checkpoint[1]))
    finally:
        db.close()
    return len(rows)
