"""Storage micro-benchmarks: the durable append path and compaction's fold, in-process.

    python -m benchmarks.storage_micro                 # sqlite appends + automerge-paper folds
    python -m benchmarks.storage_micro --postgres postgresql://postgres@127.0.0.1:5432/postgres
    python -m benchmarks.storage_micro --skip-fold --batches 2000

Appends: ``--batches`` calls of ``append_many`` with ``--per-batch`` small updates each, on a real
file with ``synchronous=FULL`` (one fsync per commit). ``sequential``: one call at a time, so every
call is one commit (latency-bound; shows the per-commit overhead). ``concurrent``: ``--producers``
callers at once, so the flusher group-commits (shows the CPU per update). Reported: wall time, CPU
of the event-loop thread (the server's thread) and of the whole process (adds the driver's threads),
per update, and updates per commit.

Fold: the trace's updates folded into a snapshot every ``--every`` updates (what the server's
compaction does), with ``fold_updates`` (a fresh Doc per fold) and with ``FoldCache`` (the Doc of
the previous fold reused); CPU per fold and in total. The final snapshot is checked against the
trace's text.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pycrdt

from storage import Store, open_store


def small_updates(count: int) -> list[bytes]:
    doc = pycrdt.Doc()
    text = doc.get("t", type=pycrdt.Text)
    out: list[bytes] = []
    doc.observe(lambda event: out.append(bytes(event.update)))
    for n in range(count):
        text.insert(len(text), f"{n % 10}")
    return out


async def bench_appends(url: str, batches: int, per_batch: int, producers: int, label: str) -> None:
    updates = small_updates(batches * per_batch)
    for mode, width in (("sequential", 1), ("concurrent", producers)):
        store = open_store(url)
        await store.open()
        try:
            await store.append("warmup", updates[0])
            commits0 = store.commits
            chunks = [updates[i:i + per_batch] for i in range(0, len(updates), per_batch)]
            next_chunk = 0

            async def producer(store: Store = store) -> None:
                nonlocal next_chunk
                while next_chunk < len(chunks):
                    chunk = chunks[next_chunk]
                    next_chunk += 1
                    await store.append_many(f"room-{next_chunk % 16}", [(u, "author") for u in chunk])

            wall0, thread0, proc0 = time.perf_counter(), time.thread_time(), time.process_time()
            await asyncio.gather(*(producer() for _ in range(width)))
            wall = time.perf_counter() - wall0
            thread = time.thread_time() - thread0
            proc = time.process_time() - proc0
            commits = store.commits - commits0
        finally:
            await store.close()
        n = len(updates)
        print(f"{label} {mode:10s} {batches} x append_many({per_batch}), {width} producer(s): "
              f"wall {wall:.2f} s ({wall / batches * 1e3:.2f} ms/call), "
              f"loop-thread CPU {thread / n * 1e6:.1f} us/update, process CPU {proc / n * 1e6:.1f} us/update, "
              f"{n / commits:.1f} updates/commit")


def bench_fold(trace_name: str, every: int, limit: int | None) -> None:
    from benchmarks.replay import build_updates, load_trace
    from storage.base import fold_updates

    built = build_updates(load_trace(trace_name), limit=limit, seed=1)  # fixed client ids: same bytes every run
    updates = built.updates
    candidates: list[tuple[str, Callable[[bytes | None, list[bytes]], bytes]]] = [("fold_updates", fold_updates)]
    try:
        from storage.base import FoldCache
    except ImportError:  # an older tree, for a before/after comparison
        pass
    else:
        cache = FoldCache()
        candidates.append(("FoldCache", lambda s, t: cache.fold("r", s, t)))
    for label, fold in candidates:
        snapshot: bytes | None = None
        total = worst = 0.0
        folds = 0
        for start in range(0, len(updates), every):
            t0 = time.thread_time()
            snapshot = fold(snapshot, updates[start:start + every])
            spent = time.thread_time() - t0
            total += spent
            worst = max(worst, spent)
            folds += 1
        assert snapshot is not None
        doc = pycrdt.Doc()
        doc.apply_update(snapshot)
        assert str(doc.get("text", type=pycrdt.Text)) == built.end_content, "fold lost something"
        print(f"{built.trace} {label:12s} {folds} folds of {every} updates: CPU {total:.2f} s total, "
              f"{total / folds * 1e3:.2f} ms/fold (worst {worst * 1e3:.2f} ms), snapshot {len(snapshot):,} B")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--per-batch", type=int, default=4)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--postgres", metavar="URL", help="also benchmark appends on this PostgreSQL database "
                        "(in a throwaway schema)")
    parser.add_argument("--skip-appends", action="store_true")
    parser.add_argument("--skip-fold", action="store_true")
    parser.add_argument("--trace", default="automerge-paper")
    parser.add_argument("--every", type=int, default=500, help="fold every N updates (the server's default)")
    parser.add_argument("--limit", type=int, help="only the first N transactions of the trace")
    args = parser.parse_args()
    if not args.skip_appends:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMPDIR")) as tmp:
            url = f"sqlite://{Path(tmp)}/bench.db?synchronous=FULL"
            asyncio.run(bench_appends(url, args.batches, args.per_batch, args.producers, "sqlite"))
        if args.postgres:
            import secrets
            sep = "&" if "?" in args.postgres else "?"
            url = f"{args.postgres}{sep}schema=bench_{secrets.token_hex(4)}"
            try:
                asyncio.run(bench_appends(url, args.batches, args.per_batch, args.producers, "postgres"))
            finally:
                asyncio.run(_drop_schema(args.postgres, url.rsplit("schema=", 1)[1]))
    if not args.skip_fold:
        bench_fold(args.trace, args.every, args.limit)


async def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
