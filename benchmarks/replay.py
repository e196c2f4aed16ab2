"""Replay a real editing trace through a server and check every client ends with the same text.

Theory of operation
-------------------
* The trace (``../shared/traces/*.json.gz``: ``txns`` of ``[position, delete, insert]`` patches) is
  turned into Yjs updates *before* the clock starts, with pycrdt, one update per transaction. That
  pass is also the reference: the rate at which pycrdt alone applies the trace in-process
  (``pycrdt_inprocess_txns_per_s``) — the physical limit a server applying the same edits faces.
  We also time applying the prebuilt updates to a fresh document (``pycrdt_apply_updates_per_s``),
  the least work a server can do per update.
* Several writers: transactions are dealt to W writers in blocks (``--block``, default 100
  keystrokes — a sentence), each writer with its own client id and document, kept in sync
  offline, so the updates carry the causal links real concurrent typists create. At replay time
  the writers send concurrently; a server must integrate updates that arrive before what they
  depend on (Yjs keeps them pending), exactly like with real clients.
* Pace: ``max`` writes as fast as the socket accepts (transport flow control is the only brake);
  ``recorded`` sends each transaction at its recorded time (gaps capped at ``--max-gap``, divided
  by ``--speed``; transactions sharing a timestamp are spread over the gap to the next one). A
  trace whose timestamps carry no pacing (automerge-paper: all within 0.3 s) is paced at
  ``--typing-rate`` transactions per second instead.
* Receivers never run a CRDT during the replay: they keep the raw frames and match them to the
  sent update (same bytes when the server relays verbatim, else the (client, clock) of the first
  struct), for latency. At the end every client's frames are applied to a fresh pycrdt document
  and its text compared with the trace's ``endContent``; then a fresh client joins, and (when we
  own the server) the server is restarted and a fresh client joins again.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import gzip
import json
import random
import sys
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pycrdt

from benchmarks import wsraw, ywire
from benchmarks.report import ROOT
from benchmarks.stats import finite, percentiles

TRACE_DIRS = (ROOT.parent / "shared" / "traces", ROOT / "traces")


def resolve_trace(name: str) -> Path:
    """A trace path, or a name like ``automerge-paper`` looked up in ``../shared/traces``."""
    path = Path(name)
    if path.exists():
        return path
    for directory in TRACE_DIRS:
        for candidate in (directory / name, directory / f"{name}.json.gz", directory / f"{name}.json"):
            if candidate.exists():
                return candidate
    raise FileNotFoundError(f"trace {name!r} not found (looked in {', '.join(str(d) for d in TRACE_DIRS)})")


def load_trace(name: str) -> dict[str, Any]:
    path = resolve_trace(name)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        trace = json.load(f)
    trace["name"] = path.name.split(".json")[0]
    return trace


def _is_ascii_only(trace: dict[str, Any]) -> bool:
    return bool(trace.get("startContent", "").isascii()) and all(
        p[2].isascii() for t in trace["txns"] for p in t["patches"])


def _patches_for(trace: dict[str, Any], txns: list[dict[str, Any]]) -> list[list[tuple[int, int, str]]]:
    if _is_ascii_only(trace) and not trace.get("startContent"):
        return [[tuple(p) for p in t["patches"]] for t in txns]  # type: ignore[misc]
    if trace.get("startContent"):
        return byte_patches([{"patches": [[0, 0, trace["startContent"]]]}, *txns])[1:]
    return byte_patches(txns)


@dataclass
class Built:
    trace: str
    end_content: str
    updates: list[bytes]  # in trace order
    writer_of: array  # writer index per update
    client_ids: list[int]
    times: list[float]  # recorded time of each txn (s, relative)
    inprocess_txns_per_s: float | None = None
    apply_updates_per_s: float | None = None
    build_seconds: float = 0.0
    txns: int = 0
    limit_reached: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def expected_text(self) -> str:
        return self.end_content


def byte_patches(txns: list[dict[str, Any]]) -> list[list[tuple[int, int, str]]]:
    """The trace's patches with positions and delete lengths in UTF-8 bytes, which is how pycrdt
    indexes a Text (the traces count code points). ASCII stretches cost nothing: a mirror of the
    text is only consulted while it holds non-ASCII characters."""
    out: list[list[tuple[int, int, str]]] = []
    mirror = ""
    for txn in txns:
        converted = []
        for pos, delete, insert in txn["patches"]:
            if mirror.isascii():
                bpos, bdel = pos, delete
            else:
                bpos = len(mirror[:pos].encode("utf-8"))
                bdel = len(mirror[pos:pos + delete].encode("utf-8")) if delete else 0
            mirror = mirror[:pos] + insert + mirror[pos + delete:]
            converted.append((bpos, bdel, insert))
        out.append(converted)
    return out


def _apply_patches(text: pycrdt.Text, patches: list[tuple[int, int, str]]) -> None:
    for pos, delete, insert in patches:
        if delete:
            del text[pos:pos + delete]
        if insert:
            text.insert(pos, insert)


def build_updates(trace: dict[str, Any], *, writers: int = 1, block: int = 100, limit: int | None = None,
                  seed: int | None = None, log: Callable[[str], None] = lambda _s: None) -> Built:
    """Turn the trace into per-transaction Yjs updates, dealt to ``writers`` in blocks."""
    txns = trace["txns"][:limit] if limit else trace["txns"]
    patches = _patches_for(trace, txns)
    rnd = random.Random(seed)
    client_ids = [rnd.randrange(1 << 20, 1 << 31) for _ in range(writers)]
    docs = [pycrdt.Doc(client_id=cid) for cid in client_ids]
    texts = [d.get("text", type=pycrdt.Text) for d in docs]
    captured: list[bytes] = []
    subs = [d.observe(lambda e: captured.append(bytes(e.update))) for d in docs]
    updates: list[bytes] = []
    writer_of = array("b")
    if trace.get("startContent"):
        with docs[0].transaction():
            texts[0].insert(0, trace["startContent"])
    started = time.perf_counter()
    edit_seconds = 0.0
    for i, txn in enumerate(txns):
        w = (i // block) % writers if writers > 1 else 0
        captured.clear()
        t0 = time.perf_counter()
        with docs[w].transaction():
            _apply_patches(texts[w], patches[i])
        edit_seconds += time.perf_counter() - t0
        if not captured:
            continue  # a no-op transaction
        update = captured[0]
        if writers > 1:
            for other in range(writers):
                if other != w:
                    docs[other].apply_update(update)  # observer fires: drop those captures
        updates.append(update)
        writer_of.append(w)
        if i and i % 50_000 == 0:
            log(f"  built {i:,}/{len(txns):,} updates")
    for d, s in zip(docs, subs):
        d.unobserve(s)
    if trace.get("startContent"):
        # the initial content is part of writer 0's document; send it first
        first = docs[0].get_update(pycrdt.Doc().get_state())
        updates.insert(0, first)
        writer_of.insert(0, 0)
    build_seconds = time.perf_counter() - started
    end_text = str(texts[0])
    full = len(txns) == len(trace["txns"])
    if full and end_text != trace["endContent"]:
        raise AssertionError("building the trace in-process did not reproduce endContent")
    times = _recorded_times(txns)
    built = Built(trace=trace.get("name", "trace"), end_content=end_text, updates=updates, writer_of=writer_of,
                  client_ids=client_ids, times=times, build_seconds=build_seconds, txns=len(txns),
                  limit_reached=not full)
    if writers == 1:
        built.inprocess_txns_per_s = len(txns) / edit_seconds if edit_seconds else None
    # the least a server does per update: apply it to a document
    doc = pycrdt.Doc()
    t0 = time.perf_counter()
    for u in updates:
        doc.apply_update(u)
    built.apply_updates_per_s = len(updates) / (time.perf_counter() - t0)
    if str(doc.get("text", type=pycrdt.Text)) != end_text:
        raise AssertionError("applying the built updates did not reproduce the text")
    return built


def reference_rate(trace: dict[str, Any], built: Built, limit: int | None = None) -> float:
    """The physical limit for a replay: pycrdt applying the trace in-process, the best of the
    build pass and one dedicated pass (a loaded machine only ever makes a pass slower, and a
    slower reference would flatter the server). Stored on ``built``."""
    best = max(built.inprocess_txns_per_s or 0.0, inprocess_rate(trace, limit))
    built.inprocess_txns_per_s = best
    return best


def inprocess_rate(trace: dict[str, Any], limit: int | None = None) -> float:
    """Transactions per second pycrdt sustains applying the trace to one local document."""
    txns = trace["txns"][:limit] if limit else trace["txns"]
    patches = _patches_for(trace, txns)
    doc = pycrdt.Doc()
    text = doc.get("text", type=pycrdt.Text)
    updates: list[bytes] = []
    sub = doc.observe(lambda e: updates.append(e.update))
    t0 = time.perf_counter()
    for txn_patches in patches:
        with doc.transaction():
            _apply_patches(text, txn_patches)
    rate = len(txns) / (time.perf_counter() - t0)
    doc.unobserve(sub)
    return rate


def _parse_time(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value) / (1000.0 if value > 1e11 else 1.0)
    return _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def _recorded_times(txns: list[dict[str, Any]]) -> list[float]:
    try:
        times = [_parse_time(t["time"]) for t in txns]
    except (KeyError, ValueError, TypeError):
        return []
    if not times:
        return []
    t0 = times[0]
    return [t - t0 for t in times]


def pace_schedule(times: list[float], n: int, *, speed: float = 1.0, max_gap: float = 1.0,
                  typing_rate: float = 10.0) -> tuple[list[float], str]:
    """Send offsets (s) for n transactions at recorded pace; returns (offsets, description)."""
    usable = len(times) >= n and n > 1 and (times[n - 1] - times[0]) / n >= 0.001
    if not usable:
        step = 1.0 / (typing_rate * speed)
        return [i * step for i in range(n)], f"uniform {typing_rate * speed:g} txn/s (trace has no usable timestamps)"
    out: list[float] = []
    clock = 0.0
    i = 0
    while i < n:
        j = i
        while j + 1 < n and times[j + 1] == times[i]:
            j += 1
        gap = min(max(times[j + 1] - times[i], 0.0), max_gap) if j + 1 < n else 0.0
        count = j - i + 1
        for k in range(count):  # spread same-stamp transactions over the gap to the next stamp
            out.append(clock + (gap * k / count) / speed)
        clock += gap / speed
        i = j + 1
    return out, f"recorded timestamps, gaps capped at {max_gap:g}s, ×{speed:g}"


class _Peer:
    """One client of the replay: a raw connection that records what it receives."""

    def __init__(self, index: int, writer: int | None, run: _Replay) -> None:
        self.index = index
        self.writer = writer  # writer index, or None for a reader
        self.run = run
        self.conn: wsraw.RawConnection | None = None
        self.step2: bytes | None = None
        self.synced = asyncio.Event()
        self.updates: list[bytes] = []
        self.update_frames = 0
        self.matched = 0
        self.last_frame_at = 0.0

    def on_message(self, conn: wsraw.RawConnection, msg: bytes) -> None:
        now = time.monotonic()
        if len(msg) < 3 or msg[0] != ywire.MSG_SYNC:
            return
        sub = msg[1]
        if sub == ywire.SYNC_UPDATE:
            self.updates.append(msg)
            self.update_frames += 1
            self.last_frame_at = now
            self.run.delivered(self, msg, now)
        elif sub == ywire.SYNC_STEP1:
            conn.write(wsraw.client_frame(ywire.STEP2_EMPTY))
        elif sub == ywire.SYNC_STEP2:
            if self.step2 is None:
                parsed = ywire.sync_payload(msg)
                self.step2 = parsed[1] if parsed else b""
                self.synced.set()
            else:
                self.updates.append(msg)


class _Replay:
    def __init__(self, built: Built, writers: int, readers: int) -> None:
        self.built = built
        self.n = len(built.updates)
        self.messages = [ywire.update_message(u) for u in built.updates]
        self.by_bytes = {m: i for i, m in enumerate(self.messages)}
        self.by_id: dict[tuple[int, int], int] = {}
        for i, u in enumerate(built.updates):
            uid = ywire.update_id(u)
            if uid is not None:
                self.by_id[uid] = i
        self.sent_at = array("d", [0.0]) * self.n
        self.latencies = array("d")
        self.peers: list[_Peer] = []
        self.writers = writers
        self.readers = readers
        self.own_count = [0] * writers
        for w in built.writer_of:
            self.own_count[w] += 1
        self.last_delivery = 0.0

    def expected_frames(self, peer: _Peer) -> int:
        return self.n - (self.own_count[peer.writer] if peer.writer is not None else 0)

    def delivered(self, peer: _Peer, msg: bytes, now: float) -> None:
        i = self.by_bytes.get(msg)
        if i is None:
            uid = ywire.relayed_update_id(msg)
            i = self.by_id.get(uid) if uid is not None else None
        if i is None:
            return
        if peer.writer is not None and self.built.writer_of[i] == peer.writer:
            return  # an echo of its own update
        sent = self.sent_at[i]
        if sent:
            self.latencies.append(now - sent)
            peer.matched += 1
        self.last_delivery = now

    def complete(self) -> bool:
        return all(p.update_frames >= self.expected_frames(p) for p in self.peers)


async def replay(url: str, built: Built, *, writers: int = 1, readers: int = 1, pace: str = "max",
                 speed: float = 1.0, max_gap: float = 1.0, typing_rate: float = 10.0,
                 room: str | None = None, settle_timeout: float = 60.0,
                 restart: Callable[[], Awaitable[None]] | None = None,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Replay ``built`` through the server at ``url``; returns the result record.

    At least one reader is always connected: it is how we know the server has relayed (and so,
    for servers that persist before relaying, stored) every update."""
    writers = max(1, writers)
    readers = max(1, readers)
    if len(built.client_ids) != writers:
        raise ValueError(f"updates were built for {len(built.client_ids)} writer(s), not {writers}")
    room = room or f"replay-{built.trace}-{random.getrandbits(32):08x}"
    run = _Replay(built, writers, readers)
    peers = [_Peer(i, i if i < writers else None, run) for i in range(writers + readers)]
    run.peers = peers
    for i, p in enumerate(peers):
        p.conn = await wsraw.connect(url, room, on_message=p.on_message, tag=p, local_host=None)
        p.conn.write(wsraw.client_frame(ywire.STEP1_EMPTY))
    await asyncio.wait_for(asyncio.gather(*(p.synced.wait() for p in peers)), 30)

    frames = [wsraw.client_frame(m) for m in run.messages]
    per_writer: list[list[int]] = [[] for _ in range(writers)]
    for i, w in enumerate(built.writer_of):
        per_writer[w].append(i)
    if pace == "recorded":
        offsets, pace_desc = pace_schedule(built.times, run.n, speed=speed, max_gap=max_gap, typing_rate=typing_rate)
    elif pace == "max":
        offsets, pace_desc = [], "as fast as possible"
    else:
        raise ValueError("pace must be 'max' or 'recorded'")
    log(f"replay {built.trace}: {run.n:,} updates, {writers} writer(s) + {readers} reader(s), pace: {pace_desc}")

    start = time.monotonic()
    send_done = [0.0] * writers

    async def write_all(w: int) -> None:
        conn = peers[w].conn
        assert conn is not None
        sent_at = run.sent_at
        for count, i in enumerate(per_writer[w]):
            if offsets:
                wait = start + offsets[i] - time.monotonic()
                if wait > 0.0005:
                    await asyncio.sleep(wait)
            if conn.transport is None:
                break
            sent_at[i] = time.monotonic()
            conn.transport.write(frames[i])
            if count % 64 == 63:
                await conn.drain()
                if not offsets:
                    await asyncio.sleep(0)  # let the other writers and the receivers run
        send_done[w] = time.monotonic()

    timeline: list[tuple[float, int]] = []

    async def progress() -> None:
        last = 0
        ticks = 0
        while True:
            await asyncio.sleep(0.5)
            ticks += 1
            done = min(p.update_frames for p in peers if p.writer is None)
            timeline.append((round(time.monotonic() - start, 2), done))
            if ticks % 4 == 0:
                log(f"  t={time.monotonic() - start:5.1f}s  delivered {done:,}/{run.n:,} "
                    f"({(done - last) / 2.0:,.0f}/s)")
                last = done

    ticker = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(write_all(w) for w in range(writers)))
        deadline_idle = settle_timeout
        while not run.complete():
            newest = max([p.last_frame_at for p in peers] + [max(send_done)])
            if time.monotonic() - newest > deadline_idle:
                break
            if any(p.conn is None or p.conn.transport is None for p in peers):
                await asyncio.sleep(0.2)
                if not run.complete():
                    break
            await asyncio.sleep(0.005)
    finally:
        ticker.cancel()
    finished = time.monotonic()
    complete = run.complete()
    last_delivery = max([run.last_delivery] + [p.last_frame_at for p in peers])
    elapsed = (last_delivery if complete else finished) - start
    closes = {str(p.conn.close_code): 1 for p in peers if p.conn is not None and p.conn.transport is None}

    # verification: every client's view, a fresh client, and (if we own the server) after a restart
    log("  verifying every client's text…")
    expected = built.expected_text()
    texts_ok = []
    for p in peers:
        doc = pycrdt.Doc()
        if p.step2:
            doc.apply_update(p.step2)
        if p.writer is not None:
            for i in per_writer[p.writer]:
                doc.apply_update(built.updates[i])
        for msg in p.updates:
            parsed = ywire.sync_payload(msg)
            if parsed:
                doc.apply_update(parsed[1])
        texts_ok.append(str(doc.get("text", type=pycrdt.Text)) == expected)
    for p in peers:
        if p.conn is not None:
            await p.conn.close()
    fresh = await fetch_text(url, room)
    fresh_ok = fresh[0] == expected
    after_restart = None
    restart_join_ms = None
    if restart is not None:
        await restart()
        text, join_s = await fetch_text(url, room)
        after_restart = text == expected
        restart_join_ms = round(join_s * 1000, 1)
    lat = percentiles(run.latencies, qs=(50, 95, 99))
    send_seconds = max(send_done) - start
    result = {
        "kind": "replay", "trace": built.trace, "url": url, "room": room, "updates": run.n, "txns": built.txns,
        "writers": writers, "readers": readers, "pace": pace, "pace_description": pace_desc,
        "complete": complete, "elapsed_s": round(elapsed, 3), "send_s": round(send_seconds, 3),
        "updates_per_s": round(run.n / elapsed, 1) if complete and elapsed > 0 else None,
        "send_updates_per_s": round(run.n / send_seconds, 1) if send_seconds > 0 else None,
        "latency_ms": {k: finite(v) for k, v in lat.items()}, "latency_samples": len(run.latencies),
        "verified_clients": sum(texts_ok), "clients": len(peers), "fresh_client_ok": fresh_ok,
        "after_restart_ok": after_restart, "restart_join_ms": restart_join_ms,
        "closes": closes, "timeline": [{"t": t, "delivered": d} for t, d in timeline],
        "pycrdt_inprocess_txns_per_s": round(built.inprocess_txns_per_s, 1) if built.inprocess_txns_per_s else None,
        "pycrdt_apply_updates_per_s": round(built.apply_updates_per_s, 1) if built.apply_updates_per_s else None,
    }
    if result["updates_per_s"] and built.inprocess_txns_per_s:
        result["ratio_to_inprocess"] = round(result["updates_per_s"] / built.inprocess_txns_per_s, 3)
    ok = all(texts_ok) and fresh_ok and after_restart is not False
    result["verified"] = ok and complete
    p = result["latency_ms"]
    log(f"  => {result['updates_per_s'] or 0:,.0f} updates/s end-to-end (sent at {result['send_updates_per_s'] or 0:,.0f}/s), "
        f"latency p50 {p['p50']} p99 {p['p99']} max {p['max']} ms; text verified on {sum(texts_ok)}/{len(peers)} clients, "
        f"fresh client {'ok' if fresh_ok else 'MISMATCH'}"
        + ("" if after_restart is None else f", after restart {'ok' if after_restart else 'MISMATCH'}")
        + ("" if complete else "  [INCOMPLETE: not every update arrived]"))
    return result


async def fetch_text(url: str, room: str, timeout: float = 60.0) -> tuple[str, float]:
    """Join ``room`` as a fresh client; return (its text, seconds from connect to step 2)."""
    payload, seconds = await join_once(url, room, timeout=timeout)
    doc = pycrdt.Doc()
    doc.apply_update(payload)
    return str(doc.get("text", type=pycrdt.Text)), seconds


async def join_once(url: str, room: str, timeout: float = 60.0) -> tuple[bytes, float]:
    """Connect, send step 1 of an empty document, wait for step 2: (its update, seconds)."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def on_message(conn: wsraw.RawConnection, msg: bytes) -> None:
        if len(msg) >= 3 and msg[0] == ywire.MSG_SYNC:
            if msg[1] == ywire.SYNC_STEP2 and not got.done():
                parsed = ywire.sync_payload(msg)
                got.set_result(parsed[1] if parsed else b"")
            elif msg[1] == ywire.SYNC_STEP1:
                conn.write(wsraw.client_frame(ywire.STEP2_EMPTY))

    started = time.perf_counter()
    conn = await wsraw.connect(url, room, on_message=on_message, timeout=timeout)
    try:
        conn.write(wsraw.client_frame(ywire.STEP1_EMPTY))
        closed = asyncio.ensure_future(asyncio.shield(conn.closed))
        done, _ = await asyncio.wait([got, closed], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        if not got.done():
            raise ConnectionError(f"no step 2 from the server (closed: {conn.close_code} {conn.close_reason})")
        seconds = time.perf_counter() - started
        return got.result(), seconds
    finally:
        await conn.close()
