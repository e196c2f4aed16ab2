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

import storage
from storage import (
    MAX_HISTORY_LIMIT,
    MAX_META_KEY_BYTES,
    MAX_META_VALUE_BYTES,
    MAX_UPDATE_BYTES,
    RoomState,
    Store,
    StoreClosed,
    StoredUpdate,
)

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


async def all_history(store: Store, room: str, **filters) -> list[StoredUpdate]:
    rows: list[StoredUpdate] = []
    while page := await store.history(room, after_id=rows[-1].id if rows else 0, **filters):
        rows.extend(page)
    return rows


async def test_unknown_room_is_empty(store: Store) -> None:
    assert await store.load("nobody-here") == RoomState(None, [], 0, 0)
    assert await store.history("nobody-here") == []
    assert await store.compact("nobody-here") is False
    assert await store.get_meta("nobody-here", "k") is None
    assert await store.list_meta("nobody-here") == {}


async def test_returned_ids_name_the_stored_rows(store: Store) -> None:
    writer = Writer("w")
    updates = [writer.insert_token() for _ in range(30)]
    ids = await asyncio.gather(*(store.append("r", u) for u in updates))
    rows = await store.history("r")
    assert {row.id: row.data for row in rows} == dict(zip(ids, updates))


async def test_ids_increase_per_room_across_rooms_compaction_and_restart(open_new) -> None:
    store = await open_new(history_keep=0)
    writers = {room: Writer(room) for room in ("a", "b")}
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for _ in range(5):
        for room, writer in writers.items():
            seen[room].append(await store.append(room, writer.insert_token()))
    assert await store.compact("a")  # history_keep=0: deletes the newest rows of "a"
    assert await store.history("a") == []
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


@pytest.mark.parametrize("history_keep", [0, 5, 20_000])
async def test_appends_racing_compaction_are_never_lost(open_new, history_keep: int) -> None:
    store = await open_new(history_keep=history_keep)
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
    rows = await all_history(store, "race")
    assert len(rows) == min(history_keep, 6 * 40)
    assert not rows or rows[-1].id == state.last_id  # pruning keeps the newest rows


@pytest.mark.parametrize("history_keep", [0, 3])
async def test_pruning_never_touches_the_tail(open_new, history_keep: int) -> None:
    # Appends land while compactions (which prune) run: whatever is not in the snapshot yet must
    # still be a row, and load's tail must be exactly the rows above the snapshot.
    store = await open_new(history_keep=history_keep)
    writers = [Writer(f"w{n}") for n in range(4)]
    turns = random.Random(5).randrange
    for _ in range(30):
        jobs = [after_turns(turns(20), store.compact("tail"))]
        jobs += [after_turns(turns(20), store.append("tail", w.insert_token())) for w in writers]
        await asyncio.gather(*jobs)
        state = await store.load("tail")
        rows = await all_history(store, "tail")
        tail = rows[len(rows) - len(state.updates) :]
        assert [r.data for r in tail] == state.updates
        assert not tail or tail[-1].id == state.last_id
        assert len(rows) - len(tail) <= history_keep
        assert_tokens(text_of(state), writers)


async def test_two_stores_on_one_storage_lose_nothing(open_new) -> None:
    store, other = await open_new(history_keep=0), await open_new(history_keep=0)
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


async def test_compaction_reuses_its_doc_only_while_the_snapshot_is_its_own(open_new) -> None:
    store, other = await open_new(), await open_new()
    writer = Writer("w")

    async def append(target: Store, count: int) -> None:
        for _ in range(count):
            await target.append("r", writer.insert_token())

    await append(store, 5)
    assert await store.compact("r")
    await append(store, 5)
    assert await store.compact("r")
    assert (store._folds.hits, store._folds.misses) == (1, 1)  # type: ignore[attr-defined]
    await append(other, 5)
    assert await other.compact("r")  # the snapshot is no longer the one store's Doc made
    await append(store, 5)
    assert await store.compact("r")
    assert (store._folds.hits, store._folds.misses) == (1, 2)  # type: ignore[attr-defined]
    assert_tokens(text_of(await store.load("r")), [writer])
    await store.close()
    assert len(store._folds) == 0  # type: ignore[attr-defined]


async def test_history_lists_rows_with_attribution(store: Store) -> None:
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

    assert await store.compact("h")  # folded rows stay in the history, with their attribution
    fourth = await store.append("h", writer.insert_token(), author="carol")
    after = await store.history("h")
    assert after[:3] == rows
    assert [(r.id, r.author) for r in after[3:]] == [(fourth, "carol")]
    assert [r.data for r in after[3:]] == (await store.load("h")).updates


async def test_history_filters_and_pages(store: Store) -> None:
    writer = Writer("w")
    authors = ["ann", "bob", None, "ann", "bob", "ann"] * 5
    ids = [await store.append("f", writer.insert_token(), author=a) for a in authors]
    await store.append("other", writer.insert_token(), author="ann")
    assert await store.compact("f")
    anns = [i for i, a in zip(ids, authors) if a == "ann"]

    assert [r.id for r in await store.history("f", author="ann")] == anns
    assert [r.id for r in await store.history("f", author="ann", limit=2)] == anns[:2]
    assert [r.id for r in await store.history("f", author="nobody")] == []
    assert [r.id for r in await store.history("f", before_id=ids[3])] == ids[:3]
    assert [r.id for r in await store.history("f", after_id=ids[2], before_id=ids[6])] == ids[3:6]
    assert [r.id for r in await store.history("f", after_id=ids[0], before_id=ids[1])] == []
    assert [
        r.id for r in await store.history("f", after_id=anns[1], before_id=anns[-1], author="ann")
    ] == anns[2:-1]
    assert [r.id for r in await all_history(store, "f", limit=7)] == ids
    assert [r.id for r in await all_history(store, "f", limit=4, author="bob")] == [
        i for i, a in zip(ids, authors) if a == "bob"
    ]
    with pytest.raises(TypeError):
        await store.history("f", before_id="9")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await store.history("f", author="")


async def test_compaction_keeps_history_but_load_returns_only_the_tail(open_new) -> None:
    store = await open_new(history_keep=3)
    writer = Writer("w")
    first = [await store.append("k", writer.insert_token(), author=f"a{n}") for n in range(10)]
    assert await store.compact("k")
    state = await store.load("k")
    assert state.updates == [] and state.last_id == first[-1]
    assert [(r.id, r.author) for r in await store.history("k")] == [
        (first[7], "a7"), (first[8], "a8"), (first[9], "a9")
    ]

    second = [await store.append("k", writer.insert_token(), author="b") for _ in range(4)]
    state = await store.load("k")
    assert len(state.updates) == 4 and state.last_id == second[-1]
    assert [r.id for r in await store.history("k")] == first[7:] + second
    assert await store.compact("k")
    assert [r.id for r in await store.history("k")] == second[1:]  # newest 3 at or below upto_id
    assert (await store.load("k")).updates == []
    assert text_of(await store.load("k")) == str(writer.text)

    # The default keeps far more than a compaction interval: nothing is pruned here.
    default = await open_new()
    for n in range(50):
        await default.append("d", writer.insert_token())
        if n % 10 == 9:
            assert await default.compact("d")
    assert len(await default.history("d")) == 50
    assert (await default.load("d")).updates == []


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
    with pytest.raises(ValueError):
        await store.rooms("ws\0")
    with pytest.raises(TypeError):
        await store.rooms(1)  # type: ignore[arg-type]


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
        store.get_meta("r", "k"),
        store.put_meta("r", "k", b"v"),
        store.list_meta("r"),
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
    with pytest.raises(ValueError):
        await store.append("r\0x", b"\0\0")  # PostgreSQL text cannot hold NUL
    for author in ("bad\0", "\udc80", "a" * 2000, ""):
        with pytest.raises(ValueError):
            await store.append("r", b"\0\0", author=author)
    with pytest.raises(TypeError):
        await store.append("r", b"\0\0", author=7)  # type: ignore[arg-type]
    assert await store.rooms() == []


async def test_a_bad_append_never_fails_the_batch_it_would_have_joined(store: Store) -> None:
    writer = Writer("w")
    good = [asyncio.create_task(store.append("b", writer.insert_token())) for _ in range(10)]
    bad = [
        asyncio.create_task(store.append("b", b"\0\0", author=author))
        for author in ("x\0", "\ud800")
    ]
    assert all(isinstance(i, int) for i in await asyncio.gather(*good))
    for task in bad:
        with pytest.raises(ValueError):
            await task


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


# -- metadata ----------------------------------------------------------------------------------


async def test_meta_round_trip_overwrite_delete_and_reopen(store: Store, open_new) -> None:
    commits = store.commits
    assert await store.get_meta("m", "owner") is None
    await store.put_meta("m", "owner", b"alice")
    await store.put_meta("m", "empty", b"")
    await store.put_meta("other", "owner", b"bob")
    assert await store.get_meta("m", "owner") == b"alice"
    assert await store.get_meta("m", "empty") == b""  # empty is a value, None is absence
    await store.put_meta("m", "owner", b"carol")
    assert await store.get_meta("m", "owner") == b"carol"
    await store.put_meta("m", "empty", None)
    await store.put_meta("m", "never-there", None)  # deleting nothing is fine
    assert await store.get_meta("m", "empty") is None
    assert await store.list_meta("m") == {"owner": b"carol"}
    assert await store.get_meta("other", "owner") == b"bob"
    assert store.commits == commits  # metadata does not ride on group commit
    assert await store.rooms() == []  # nor does it make a room
    await store.close()

    again = await open_new()
    assert await again.list_meta("m") == {"owner": b"carol"}
    assert await again.list_meta("other") == {"owner": b"bob"}


async def test_meta_is_listed_by_prefix(store: Store) -> None:
    keys = ["undo/alice", "undo/bob", "undo", "undo0", "invite/x", "é/ü", "z\U0010ffff"]
    for n, key in enumerate(keys):
        await store.put_meta("r", key, f"{n}".encode())
    await store.put_meta("s", "undo/eve", b"elsewhere")

    assert list(await store.list_meta("r")) == sorted(keys)
    assert await store.list_meta("r", "undo/") == {"undo/alice": b"0", "undo/bob": b"1"}
    assert list(await store.list_meta("r", "undo")) == ["undo", "undo/alice", "undo/bob", "undo0"]
    assert await store.list_meta("r", "é/") == {"é/ü": b"5"}
    assert await store.list_meta("r", "z\U0010ffff") == {"z\U0010ffff": b"6"}
    assert await store.list_meta("r", "nope") == {}


async def test_meta_bounds(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    await store.put_meta("r", "k" * MAX_META_KEY_BYTES, b"v" * MAX_META_VALUE_BYTES)
    assert await store.get_meta("r", "k" * MAX_META_KEY_BYTES) == b"v" * MAX_META_VALUE_BYTES
    await store.put_meta("r", "é" * (MAX_META_KEY_BYTES // 2), b"2-byte characters")
    for key in ("k" * (MAX_META_KEY_BYTES + 1), "é" * (MAX_META_KEY_BYTES // 2 + 1), "", "a\0b",
                "\ud800"):
        with pytest.raises(ValueError):
            await store.put_meta("r", key, b"v")
        with pytest.raises(ValueError):
            await store.get_meta("r", key)
    with pytest.raises(ValueError):
        await store.put_meta("r", "k", b"v" * (MAX_META_VALUE_BYTES + 1))
    with pytest.raises(TypeError):
        await store.put_meta("r", "k", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await store.put_meta("r", 7, b"v")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await store.put_meta("", "k", b"v")
    assert len(await store.list_meta("r")) == 2

    # Keys per room are bounded too (lowered here: 10k transactions would be slow).
    for module in (storage.sqlite, storage.postgres):
        monkeypatch.setattr(module, "MAX_META_KEYS", 5)
    for n in range(3):
        await store.put_meta("r", f"n{n}", b"x")
    with pytest.raises(ValueError, match="5 meta keys"):
        await store.put_meta("r", "one-too-many", b"x")
    await store.put_meta("r", "n0", b"overwriting is fine")
    await store.put_meta("r", "n0", None)
    await store.put_meta("r", "one-too-many", b"room again")
    await store.put_meta("other", "k", b"other rooms have their own bound")


async def test_concurrent_meta_writers_leave_one_value(store: Store, open_new) -> None:
    other = await open_new()
    await asyncio.gather(
        *(s.put_meta("c", f"k{n % 5}", f"{n}".encode()) for n in range(40) for s in (store, other))
    )
    values = await store.list_meta("c")
    assert sorted(values) == [f"k{n}" for n in range(5)]
    assert values == await other.list_meta("c")
    assert all(int(v) % 5 == int(k[1]) for k, v in values.items())


async def test_append_many_is_durable_in_order_with_authors(store):
    doc = pycrdt.Doc()
    text = doc.get("text", type=pycrdt.Text)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(bytes(event.update)))
    for i in range(300):  # more than one multi-row INSERT's worth (SQLite writes 64 rows per statement)
        text.insert(len(str(text)), str(i % 10))
    pairs = [(u, f"user-{i % 3}") for i, u in enumerate(updates)]
    first, rest = await asyncio.gather(store.append_many("many", pairs[:10]), store.append_many("many", pairs[10:]))
    ids = first + rest
    assert ids == sorted(ids) and len(set(ids)) == 300
    rows = await store.history("many")
    assert [r.author for r in rows] == [a for _, a in pairs]
    assert [r.id for r in rows] == ids
    assert [r.data for r in rows] == [u for u, _ in pairs]
    state = await store.load("many")
    fresh = pycrdt.Doc()
    for u in state.updates:
        fresh.apply_update(u)
    assert str(fresh.get("text", type=pycrdt.Text)) == str(text)


async def test_one_call_with_more_rows_than_the_backpressure_bound_is_written(open_new) -> None:
    """The hub hands a whole round to one ``append_rows``; after a slow commit (a stalled disk,
    a busy host) that round can hold more updates than ``max_pending`` allows in flight. The
    call must write what it queued to make room for the rest, not wait for room forever."""
    store = await open_new(max_pending=7)
    writer = Writer("w")
    rows = [(f"room-{n % 3}", writer.insert_token(), "u") for n in range(50)]
    ids = await asyncio.wait_for(store.append_rows(rows), timeout=20)
    assert ids == sorted(ids) and len(set(ids)) == 50
    stored = [row for room in ("room-0", "room-1", "room-2") for row in await store.history(room)]
    assert sorted(r.id for r in stored) == ids
    assert store.commits >= 50 // 7  # never more than 7 queued or being written
