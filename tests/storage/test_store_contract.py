"""The contract every Store backend keeps, run against each backend in conftest.BACKENDS."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import re
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pycrdt
import pytest

from storage import MAX_HISTORY_LIMIT, MAX_UPDATE_BYTES, RoomState, Store, StoreClosed

TRACE = Path("/work/shared/traces/automerge-paper.json.gz")
T = TypeVar("T")
TOKEN = re.compile(r"<[a-z0-9]+:\d+>")


class Writer:
    """One client editing its own copy of the document: each call yields one Yjs update."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.doc = pycrdt.Doc()
        self.text = self.doc.get("t", type=pycrdt.Text)
        self.tokens: list[str] = []
        self._updates: list[bytes] = []
        self.doc.observe(lambda event: self._updates.append(event.update))

    def insert_token(self) -> bytes:
        token = f"<{self.name}:{len(self.tokens)}>"
        self.text.insert(len(self.text), token)
        self.tokens.append(token)
        return self._updates.pop()


async def after_turns(turns: int, job: Awaitable[T]) -> T:
    for _ in range(turns):
        await asyncio.sleep(0)
    return await job


def text_of(state: RoomState) -> str:
    doc = pycrdt.Doc()
    if state.snapshot is not None:
        doc.apply_update(state.snapshot)
    for update in state.updates:
        doc.apply_update(update)
    return str(doc.get("t", type=pycrdt.Text))


def assert_tokens(text: str, writers: list[Writer]) -> None:
    """Every token of every writer is present exactly once, each writer's in its own order."""
    found = TOKEN.findall(text)
    assert sorted(found) == sorted(t for w in writers for t in w.tokens)
    for writer in writers:
        mine = [t for t in found if t.startswith(f"<{writer.name}:")]
        assert mine == writer.tokens


async def test_round_trip_reproduces_the_document(store: Store) -> None:
    doc = pycrdt.Doc()
    text = doc.get("t", type=pycrdt.Text)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    text.insert(0, "hello world")
    text.insert(5, ", dear")
    del text[0:1]
    text.insert(0, "H")
    text.insert(len(text), " — ünïcode ✓")

    ids = [await store.append("doc", u, author="alice") for u in updates]

    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    state = await store.load("doc")
    assert state.snapshot is None
    assert state.updates == updates
    assert state.last_id == ids[-1]
    assert state.tail_bytes == sum(len(u) for u in updates)
    assert text_of(state) == str(text) == "Hello, dear world — ünïcode ✓"


async def test_unknown_room_is_empty(store: Store) -> None:
    assert await store.load("nobody-here") == RoomState(None, [], 0, 0)
    assert await store.history("nobody-here") == []
    assert await store.compact("nobody-here") is False


async def test_returned_ids_name_the_stored_rows(store: Store) -> None:
    writer = Writer("w")
    updates = [writer.insert_token() for _ in range(30)]
    ids = await asyncio.gather(*(store.append("r", u) for u in updates))
    rows = await store.history("r")
    assert {row.id: row.data for row in rows} == dict(zip(ids, updates))


async def test_ids_increase_per_room_across_rooms_compaction_and_restart(
    store: Store, open_new
) -> None:
    writers = {room: Writer(room) for room in ("a", "b")}
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for _ in range(5):
        for room, writer in writers.items():
            seen[room].append(await store.append(room, writer.insert_token()))
    assert await store.compact("a")  # deletes the newest rows of "a"
    await store.close()

    again = await open_new()
    for room, writer in writers.items():
        seen[room].append(await again.append(room, writer.insert_token()))
    for ids in seen.values():
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert (await again.load("a")).last_id == seen["a"][-1]


async def test_concurrent_appends_are_all_durable_and_group_committed(store: Store) -> None:
    writers = [Writer(f"w{n}") for n in range(50)]
    commits_before = store.commits

    async def edit(writer: Writer) -> list[int]:
        return [await store.append("busy", writer.insert_token()) for _ in range(40)]

    per_writer = await asyncio.gather(*(edit(w) for w in writers))
    ids = [i for writer_ids in per_writer for i in writer_ids]

    assert len(ids) == len(set(ids)) == 2000
    state = await store.load("busy")
    assert len(state.updates) == 2000
    assert_tokens(text_of(state), writers)
    commits = store.commits - commits_before
    assert commits <= 2000 / 10, f"{commits} commits for 2000 appends: no group commit"


async def test_state_survives_close_and_reopen(store: Store, open_new) -> None:
    writer = Writer("w")
    for _ in range(20):
        await store.append("persist", writer.insert_token())
    await store.compact("persist")
    for _ in range(5):
        await store.append("persist", writer.insert_token())
    before = await store.load("persist")
    await store.close()

    after = await (await open_new()).load("persist")
    assert after == before
    assert text_of(after) == str(writer.text)


async def test_compaction_keeps_the_document_and_empties_the_tail(store: Store) -> None:
    writer = Writer("w")
    for n in range(200):
        await store.append("c", writer.insert_token())
        if n % 3 == 0:
            del writer.text[0:2]
            await store.append("c", writer._updates.pop())
    before = await store.load("c")

    assert await store.compact("c") is True
    after = await store.load("c")
    assert after.snapshot is not None and after.updates == [] and after.tail_bytes == 0
    assert after.last_id == before.last_id
    assert text_of(after) == text_of(before) == str(writer.text)
    assert await store.compact("c") is False  # nothing left to fold

    new_id = await store.append("c", writer.insert_token())
    tail = await store.load("c")
    assert new_id > before.last_id and tail.last_id == new_id and len(tail.updates) == 1
    assert await store.compact("c") is True
    assert text_of(await store.load("c")) == str(writer.text)


async def test_compaction_keeps_updates_whose_dependencies_are_missing(store: Store) -> None:
    # A peer may hand over updates that build on ones the store has not seen yet (another provider,
    # a bus gap). A fresh Doc cannot integrate those, and Doc.get_update() would silently drop them.
    doc = pycrdt.Doc()
    text = doc.get("t", type=pycrdt.Text)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    text.insert(0, "abc")
    text.insert(3, "def")
    del text[0:1]
    first, second, deletion = updates

    await store.append("gap", second)
    await store.append("gap", deletion)
    assert await store.compact("gap")
    await store.append("gap", first)
    assert text_of(await store.load("gap")) == "bcdef"
    assert await store.compact("gap")
    state = await store.load("gap")
    assert state.updates == [] and text_of(state) == "bcdef"


async def test_appends_racing_compaction_are_never_lost(store: Store) -> None:
    writers = [Writer(f"w{n}") for n in range(6)]
    turns = random.Random(7).randrange
    for _ in range(40):
        jobs = [after_turns(turns(30), store.compact("race")) for _ in range(2)]
        jobs += [after_turns(turns(30), store.append("race", w.insert_token())) for w in writers]
        await asyncio.gather(*jobs)
    assert_tokens(text_of(await store.load("race")), writers)
    await store.compact("race")
    state = await store.load("race")
    assert state.updates == []
    assert_tokens(text_of(state), writers)


async def test_two_stores_on_one_storage_lose_nothing(store: Store, open_new) -> None:
    other = await open_new()
    writers = {
        s: [Writer(f"{name}{n}") for n in range(4)] for s, name in ((store, "a"), (other, "b"))
    }
    turns = random.Random(11).randrange
    for _ in range(60):
        # Scheduling jitter (not time): compactions start before, between and after the appends,
        # so one store often folds rows the other's compaction has not seen.
        jobs = [after_turns(turns(30), s.compact("shared")) for s in (store, other) * 3]
        jobs += [
            after_turns(turns(30), s.append("shared", w.insert_token()))
            for s, ws in writers.items()
            for w in ws
        ]
        await asyncio.gather(*jobs)
    everyone = [w for ws in writers.values() for w in ws]
    assert_tokens(text_of(await store.load("shared")), everyone)
    assert_tokens(text_of(await other.load("shared")), everyone)
    await asyncio.gather(store.compact("shared"), other.compact("shared"))
    state = await (await open_new()).load("shared")
    assert state.updates == []
    assert_tokens(text_of(state), everyone)


async def test_history_lists_the_tail_with_attribution(store: Store) -> None:
    writer = Writer("w")
    start = time.time()
    first = await store.append("h", writer.insert_token(), author="alice")
    second = await store.append("h", writer.insert_token(), author=None, ts=1234.5)
    third = await store.append("h", writer.insert_token(), author="bob")

    rows = await store.history("h")
    assert [(r.id, r.room, r.author) for r in rows] == [
        (first, "h", "alice"),
        (second, "h", None),
        (third, "h", "bob"),
    ]
    assert start - 1 <= rows[0].ts <= time.time() + 1
    assert rows[1].ts == 1234.5
    assert [r.id for r in await store.history("h", after_id=first)] == [second, third]
    assert [r.id for r in await store.history("h", after_id=first, limit=1)] == [second]
    with pytest.raises(ValueError):
        await store.history("h", limit=0)
    with pytest.raises(ValueError):
        await store.history("h", limit=MAX_HISTORY_LIMIT + 1)

    await store.compact("h")  # folded rows leave the history
    fourth = await store.append("h", writer.insert_token(), author="carol")
    assert [(r.id, r.author) for r in await store.history("h")] == [(fourth, "carol")]


async def test_rooms_are_listed_by_prefix(store: Store) -> None:
    names = ["ws1/doc-a", "ws1/doc-b", "ws10/doc", "ws2/doc", "ws1", "é/ünï", "ws1/doc-a/sub"]
    for name in names:
        await store.append(name, Writer("w").insert_token())
    await store.compact("ws1/doc-b")  # compacted rooms are still rooms

    assert await store.rooms() == sorted(names)
    assert await store.rooms("ws1/") == ["ws1/doc-a", "ws1/doc-a/sub", "ws1/doc-b"]
    assert await store.rooms("ws1") == [
        "ws1", "ws1/doc-a", "ws1/doc-a/sub", "ws1/doc-b", "ws10/doc"
    ]
    assert await store.rooms("é/") == ["é/ünï"]
    assert await store.rooms("zzz") == []


async def test_flush_returns_once_everything_appended_is_committed(store: Store) -> None:
    writer = Writer("w")
    tasks = [asyncio.create_task(store.append("f", writer.insert_token())) for _ in range(100)]
    await asyncio.sleep(0)  # one loop turn: every task has queued its update
    await store.flush()
    assert len(await store.history("f")) == 100
    await asyncio.gather(*tasks)
    await store.flush()  # nothing pending: returns at once


async def test_a_cancelled_appender_does_not_disturb_the_others(store: Store) -> None:
    writer = Writer("w")
    tasks = [asyncio.create_task(store.append("x", writer.insert_token())) for _ in range(20)]
    await asyncio.sleep(0)
    tasks[5].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[5], asyncio.CancelledError)
    assert all(isinstance(i, int) for n, i in enumerate(done) if n != 5)
    await store.flush()
    assert await store.append("x", writer.insert_token()) > max(
        i for i in done if isinstance(i, int)
    )


async def test_ping_and_every_operation_fail_on_a_closed_store(store: Store) -> None:
    await store.ping()
    writer = Writer("w")
    pending = asyncio.create_task(store.append("r", writer.insert_token()))
    await asyncio.sleep(0)
    await asyncio.gather(store.close(), store.close())  # idempotent, concurrent callers both wait
    assert isinstance(await pending, int)  # close commits what was queued before it

    with pytest.raises(StoreClosed):
        await store.ping()
    for operation in (
        store.append("r", writer.insert_token()),
        store.load("r"),
        store.compact("r"),
        store.history("r"),
        store.rooms(),
    ):
        with pytest.raises(StoreClosed):
            await operation
    await store.close()


async def test_bad_arguments_are_refused(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.append("r", b"")
    with pytest.raises(ValueError):
        await store.append("r", b"\0" * (MAX_UPDATE_BYTES + 1))
    with pytest.raises(ValueError):
        await store.append("", b"\0\0")
    with pytest.raises(ValueError):
        await store.append("r" * 2000, b"\0\0")
    with pytest.raises(ValueError):
        await store.append("\ud800", b"\0\0")
    with pytest.raises(TypeError):
        await store.append("r", "not bytes")  # type: ignore[arg-type]
    assert await store.rooms() == []


async def test_real_editing_trace_survives_appends_and_compactions(store: Store) -> None:
    with gzip.open(TRACE, "rt") as f:
        txns = json.load(f)["txns"][:10_000]
    doc = pycrdt.Doc()
    text = doc.get("t", type=pycrdt.Text)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    expected = ""
    pending: list[asyncio.Task[int]] = []
    for n, txn in enumerate(txns, 1):
        for position, deleted, inserted in txn["patches"]:
            if deleted:
                del text[position : position + deleted]
            if inserted:
                text.insert(position, inserted)
            expected = expected[:position] + inserted + expected[position + deleted :]
        while updates:
            pending.append(asyncio.create_task(store.append("paper", updates.pop(0))))
        if n % 2500 == 0:
            await asyncio.gather(*pending)
            pending.clear()
            assert await store.compact("paper")
    await asyncio.gather(*pending)

    assert str(text) == expected
    state = await store.load("paper")
    assert state.snapshot is not None and len(state.updates) < 2500
    assert text_of(state) == expected
