"""A separate server process for the multi-process store tests (run as a script, not collected).

Works with any store URL (SQLite file, PostgreSQL).
Opens the store, prints ``ready <pid of its SQLite writer process, or 0>``, waits for a line on stdin (so several workers start together),
then runs TASKS writers that each append COUNT tokens (forever if COUNT < 0) and print
``committed <id> <writer> <token>`` after each append returned, i.e. after its commit, and
``compacted <True|False>`` after each compaction (``--compact-every N`` appends of a writer).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import pycrdt

from storage import open_store


async def write(store, room: str, name: str, count: int, compact_every: int) -> None:
    doc = pycrdt.Doc()
    text = doc.get("t", type=pycrdt.Text)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    n = 0
    while count < 0 or n < count:
        token = f"<{name}:{n}>"
        text.insert(len(text), token)
        update_id = await store.append(room, updates.pop(), author=name)
        print(f"committed {update_id} {name} {token}", flush=True)
        n += 1
        if compact_every and n % compact_every == 0:
            print(f"compacted {await store.compact(room)}", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("room")
    parser.add_argument("name")
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--compact-every", type=int, default=0)
    args = parser.parse_args()

    store = open_store(args.url)
    await store.open()
    process = getattr(store, "_process", None)  # the SQLite writer process, if it has one
    print(f"ready {process.proc.pid if process is not None else 0}", flush=True)
    sys.stdin.readline()
    await asyncio.gather(
        *(
            write(store, args.room, f"{args.name}{k}", args.count, args.compact_every)
            for k in range(args.tasks)
        )
    )
    await store.close()
    print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
