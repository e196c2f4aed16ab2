"""SQLite-only behaviour: URLs, pragmas, OS processes sharing a file, kill -9, failing commits."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import sys
from pathlib import Path

import pycrdt
import pytest

from storage import PostgresStore, RoomState, SQLiteStore, StoreClosed, StoreError, open_store
import storage.sqlite as storage_sqlite
from storage.sqlite import MIGRATIONS, SCHEMA_VERSION
from servers import wait_until

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("store_worker.py")
COMMITTED = re.compile(r"committed (\d+) (\S+) (\S+)")


def update_of(text: str) -> bytes:
    doc = pycrdt.Doc()
    doc.get("t", type=pycrdt.Text).insert(0, text)
    return doc.get_update()


def text_of_store_state(snapshot: bytes | None, updates: list[bytes]) -> str:
    doc = pycrdt.Doc()
    for update in ([snapshot] if snapshot else []) + updates:
        doc.apply_update(update)
    return str(doc.get("t", type=pycrdt.Text))


async def append_many(store: SQLiteStore, count: int) -> list[int | BaseException]:
    """Concurrent appends to room "r"; a failing commit must fail them, never hang them."""
    appends = (store.append("r", update_of(f"u{n}")) for n in range(count))
    return await asyncio.wait_for(asyncio.gather(*appends, return_exceptions=True), timeout=10)


@pytest.fixture
async def opened(tmp_path: Path):
    stores: list[SQLiteStore] = []

    async def factory(**options) -> SQLiteStore:
        store = SQLiteStore(tmp_path / "collab.db", **options)
        await store.open()
        stores.append(store)
        return store

    yield factory
    for store in stores:
        await store.close()


# -- URLs and setup ----------------------------------------------------------------------------


def test_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    def path_of(url: str) -> Path:
        store = open_store(url)
        assert isinstance(store, SQLiteStore)
        return store.path

    assert path_of("data/x.db") == Path("data/x.db")
    assert path_of(f"sqlite://{tmp_path}/x.db") == tmp_path / "x.db"
    assert path_of("sqlite:rel/x.db") == Path("rel/x.db")
    tuned = open_store("sqlite:x.db?synchronous=normal&busy_timeout=2.5")
    assert isinstance(tuned, SQLiteStore)
    assert (tuned.synchronous, tuned.busy_timeout) == ("NORMAL", 2.5)
    overridden = open_store("sqlite:x.db?synchronous=normal", synchronous="FULL")
    assert overridden.synchronous == "FULL"  # type: ignore[attr-defined]

    assert open_store("sqlite:x.db?history_keep=7").history_keep == 7  # type: ignore[attr-defined]
    assert open_store("x.db", history_keep=0).history_keep == 0  # type: ignore[attr-defined]
    for url in ("postgresql://u@h/db", "postgres://u@h/db"):
        assert isinstance(open_store(url), PostgresStore)
    for bad in ("mysql://h/db", "sqlite://host/x.db", "sqlite:x.db?nope=1", ":memory:", ""):
        with pytest.raises(ValueError):
            open_store(bad)
    with pytest.raises(ValueError):
        open_store("x.db", synchronous="OFF")
    with pytest.raises(ValueError):
        open_store("x.db", history_keep=-1)


async def test_relative_url_creates_parent_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with open_store("sqlite:deep/er/collab.db") as store:
        await store.append("r", update_of("x"))
    assert (tmp_path / "deep/er/collab.db").is_file()


@pytest.mark.parametrize("synchronous, level", [("FULL", 2), ("NORMAL", 1)])
async def test_wal_and_synchronous_are_set(opened, synchronous: str, level: int) -> None:
    store = await opened(synchronous=synchronous)
    assert store._writer is not None
    assert list(await store._writer.execute_fetchall("PRAGMA synchronous")) == [(level,)]
    with sqlite3.connect(store.path) as probe:
        assert probe.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert probe.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION,)
        ]


async def test_a_version_1_file_is_migrated_in_place(opened, tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "collab.db") as db:  # as the previous release left it
        for statement in MIGRATIONS[1]:
            db.execute(statement)
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (1)")
        db.execute("INSERT INTO updates (room, data, author, ts) VALUES ('r', ?, 'old', 1.0)",
                   (update_of("old"),))
        db.execute("INSERT INTO rooms VALUES ('r', 1.0)")
    store = await opened()
    assert [(r.author, r.ts) for r in await store.history("r")] == [("old", 1.0)]
    await store.put_meta("r", "owner", b"alice")
    assert await store.list_meta("r") == {"owner": b"alice"}
    with sqlite3.connect(tmp_path / "collab.db") as probe:
        assert probe.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


async def test_a_newer_schema_is_refused(opened, tmp_path: Path) -> None:
    store = await opened()
    await store.close()
    with sqlite3.connect(tmp_path / "collab.db") as db:
        db.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        await opened()


# -- several OS processes ------------------------------------------------------------------------


async def spawn(url: str, name: str, *args: str) -> asyncio.subprocess.Process:
    """A store_worker process; its ``writer_pid``: its store's writer process (0: none)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(WORKER), url, "room", name, *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
    assert (match := re.fullmatch(rb"ready (\d+)\n", line)), line
    process.writer_pid = int(match[1])  # type: ignore[attr-defined]
    return process


def running(pid: int) -> bool:
    """Is ``pid`` a live process (not gone, not a zombie waiting to be reaped)?"""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def go(*processes: asyncio.subprocess.Process) -> None:
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(b"go\n")


def committed(output: bytes) -> dict[int, tuple[str, str]]:
    found = {}
    for line in output.decode().splitlines():
        if match := COMMITTED.fullmatch(line):
            found[int(match[1])] = (match[2], match[3])
    return found


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_processes_appending_and_compacting_together_lose_nothing(tmp_path: Path, writer: str) -> None:
    url = f"sqlite://{tmp_path}/shared.db?history_keep=0&writer={writer}"  # compaction deletes: the risky path
    workers = [
        await spawn(url, name, "--tasks", "4", "--count", "100", "--compact-every", "20")
        for name in ("p", "q")
    ]
    go(*workers)
    outputs = await asyncio.wait_for(asyncio.gather(*(w.communicate() for w in workers)), 60)
    assert [w.returncode for w in workers] == [0, 0]
    reported = {}
    for stdout, _ in outputs:
        assert stdout.endswith(b"done\n")
        reported.update(committed(stdout))
    assert len(reported) == 800  # ids are unique across processes

    async with open_store(url) as store:
        state = await store.load("room")
        tokens = re.findall(r"<[a-z0-9]+:\d+>", text_of_store_state(state.snapshot, state.updates))
        assert sorted(tokens) == sorted(token for _, token in reported.values())
        assert state.last_id == max(reported)


@pytest.mark.parametrize("synchronous, writer", [("FULL", "thread"), ("NORMAL", "thread"), ("FULL", "process")])
async def test_kill_9_loses_no_reported_commit(tmp_path: Path, synchronous: str, writer: str) -> None:
    url = f"sqlite://{tmp_path}/crash.db?synchronous={synchronous}&writer={writer}"
    worker = await spawn(url, "k", "--tasks", "8", "--count", "-1")
    assert (worker.writer_pid > 0) == (writer == "process")  # type: ignore[attr-defined]
    go(worker)
    assert worker.stdout is not None
    seen = b""
    while seen.count(b"\n") < 400:
        chunk = await asyncio.wait_for(worker.stdout.read(4096), timeout=30)
        assert chunk, "worker exited early"
        seen += chunk
    worker.send_signal(signal.SIGKILL)
    seen += await worker.stdout.read()  # lines printed before death were committed too
    await worker.wait()
    assert worker.returncode == -signal.SIGKILL
    reported = committed(seen)
    assert len(reported) >= 400
    if writer == "process":  # the dead server's writer process sees EOF and exits on its own
        await wait_until(lambda: not running(worker.writer_pid), timeout=10)  # type: ignore[attr-defined]

    async with open_store(url) as store:
        rows = {}
        while page := await store.history("room", after_id=max(rows, default=0)):
            rows.update((row.id, row) for row in page)
        for update_id, (author, _) in reported.items():
            assert rows[update_id].author == author
        state = await store.load("room")
        text = text_of_store_state(state.snapshot, state.updates)
        assert all(token in text for _, token in reported.values())


# -- failures ------------------------------------------------------------------------------------


# A batch to a room this store has written before is one autocommit INSERT; a batch with a new room
# is a BEGIN IMMEDIATE transaction (rows, then the rooms table). Both must wait for, then fail on,
# another process's write lock.
@pytest.mark.parametrize("room_known", [False, True], ids=["new-room", "known-room"])
async def test_a_locked_database_fails_the_waiting_appends_then_recovers(opened, room_known: bool) -> None:
    store = await opened(busy_timeout=0.05)
    if room_known:
        await store.append("r", update_of("before"))
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        results = await append_many(store, 20)
        assert all(isinstance(r, StoreError) for r in results), results
        assert "locked" in str(results[0])
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    await store.ping()
    kept = await store.append("r", update_of("kept"))
    state = await store.load("r")
    assert state.last_id == kept and len(state.updates) == 1 + room_known


async def test_a_read_only_database_fails_appends_and_compaction_until_writable(opened) -> None:
    store = await opened()
    await store.append("r", update_of("a"))
    assert store._writer is not None and store._maint is not None
    for db in (store._writer, store._maint):  # as if the disk went read-only (both files)
        await db.execute("PRAGMA query_only = ON")
    results = await append_many(store, 10)
    assert all(isinstance(r, StoreError) for r in results), results
    with pytest.raises(StoreError):
        await store.compact("r")

    with pytest.raises(StoreError):
        await store.put_meta("r", "k", b"v")

    for db in (store._writer, store._maint):
        await db.execute("PRAGMA query_only = OFF")
    assert await store.append("r", update_of("b")) > 0
    assert await store.compact("r")
    await store.put_meta("r", "k", b"v")
    assert (await store.load("r")).updates == []
    assert len(await store.history("r")) == 2  # kept as history


async def test_a_broken_writer_connection_is_replaced(opened) -> None:
    store = await opened()
    assert store._writer is not None
    await store._writer.close()  # the connection died under the store
    results = await append_many(store, 5)
    assert all(isinstance(r, StoreError) for r in results), results
    assert await store.append("r", update_of("ok")) > 0
    assert store._reader is not None
    await store._reader.close()
    with pytest.raises(StoreError):
        await store.load("r")
    assert len((await store.load("r")).updates) == 1


async def test_a_stopped_flusher_fails_appends_instead_of_hanging(opened) -> None:
    store = await opened()
    assert store._flusher is not None
    store._flusher.cancel()
    with pytest.raises(StoreError):
        await asyncio.wait_for(store.append("r", update_of("x")), timeout=5)
    with pytest.raises(StoreError):
        await store.ping()


async def test_backpressure_bounds_each_batch(opened) -> None:
    store = await opened(max_pending=3)
    ids = await asyncio.gather(*(store.append("r", update_of(f"{n}")) for n in range(60)))
    assert sorted(ids) == ids and len(set(ids)) == 60
    assert store.commits >= 20  # never more than 3 updates queued or in flight


async def test_closing_refuses_appends_waiting_for_room(opened) -> None:
    store = await opened(max_pending=1)
    first = asyncio.create_task(store.append("r", update_of("first")))
    waiting = asyncio.create_task(store.append("r", update_of("second")))
    await asyncio.sleep(0)
    await store.close()
    assert isinstance(await first, int)
    with pytest.raises(StoreClosed):
        await waiting


# -- one thread hop per transaction ----------------------------------------------------------------


class _CountingQueue:
    """Stands in for an aiosqlite connection's call queue (``_tx``) and counts what is put on it;
    the connection's thread keeps reading the real queue, which gets everything."""

    def __init__(self, queue, hops: dict[str, int], key: str) -> None:  # type: ignore[no-untyped-def]
        self.queue, self.hops, self.key = queue, hops, key

    def put_nowait(self, item) -> None:  # type: ignore[no-untyped-def]
        self.hops[self.key] += 1
        self.queue.put_nowait(item)


def count_hops(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Calls queued on the writer's, reader's and maintenance connection's threads (each one hop
    and one loop wakeup)."""
    hops = {"writer": 0, "reader": 0, "maint": 0}
    for key, db in (("writer", store._writer), ("reader", store._reader), ("maint", store._maint)):
        monkeypatch.setattr(db, "_tx", _CountingQueue(db._tx, hops, key))
    return hops


async def test_a_batch_compaction_and_meta_are_one_hop_each(opened, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await opened()
    hops = count_hops(store, monkeypatch)
    ids = await store.append_many("r", [(update_of(f"u{n}"), "a") for n in range(4)])  # new room too
    assert hops == {"writer": 1, "reader": 0, "maint": 0} and store.commits == 1
    assert ids == list(range(ids[0], ids[0] + 4))
    assert await store.rooms() == ["r"]

    hops.update(writer=0, reader=0)
    assert await store.compact("r")
    # On the archive's connection only: merge + read snapshot and tail; write snapshot + prune.
    assert hops == {"writer": 0, "reader": 0, "maint": 2}

    hops.update(writer=0, reader=0, maint=0)
    await store.put_meta("r", "k", b"v")
    await store.load("r")
    assert hops == {"writer": 1, "reader": 1, "maint": 0}


async def test_concurrent_reads_are_queued_at_once_and_each_gets_its_own_answer(
        opened, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads go straight onto the reader's queue, not one at a time behind a lock that waits for
    each to come back to the event loop (1,000 joiners waited ~600 ms for their room loads), and
    room loads asked for together are one read. Interleaved, every read still answers for itself
    -- ``rooms`` included, which steps a cursor."""
    store = await opened()
    for n in range(30):
        await store.append_many(f"room-{n:02}", [(update_of(f"{n}-{k}"), f"a{n}") for k in range(n % 4 + 1)])
    hops = count_hops(store, monkeypatch)
    reads = [asyncio.ensure_future(store.load(f"room-{n:02}")) for n in range(30)]
    reads += [asyncio.ensure_future(store.history(f"room-{n:02}")) for n in range(30)]
    reads += [asyncio.ensure_future(store.rooms(prefix)) for prefix in ("", "room-1", "room-2", "x")]
    await asyncio.sleep(0)  # one turn: every read has started
    assert hops["reader"] == 34  # the histories and room listings, queued on the reader already
    answers = await asyncio.gather(*reads)
    assert hops["reader"] == 35  # + the 30 room loads, one read
    for n in range(30):
        assert len(answers[n].updates) == n % 4 + 1
        assert [row.author for row in answers[30 + n]] == [f"a{n}"] * (n % 4 + 1)
    assert answers[60] == [f"room-{n:02}" for n in range(30)]
    assert answers[61] == [f"room-{n:02}" for n in range(10, 20)]
    assert answers[62] == [f"room-{n:02}" for n in range(20, 30)]
    assert answers[63] == []


async def test_rooms_loaded_together_read_as_each_alone(opened, monkeypatch: pytest.MonkeyPatch) -> None:
    """One batched read serves rooms in every state at once -- snapshot and archived tail, rows
    still only in ``recent``, rows in both files, no rows at all -- and hands each its own: the
    same snapshot, tail and last id as that room loaded alone."""
    monkeypatch.setattr(storage_sqlite, "MERGE_ROWS", 4)
    store = await opened()
    for n in range(3):
        await store.append("folded", update_of(f"f{n}"))
    assert await store.compact("folded")  # a snapshot; its rows kept as history
    for n in range(3, 7):  # a tail, partly copied to the archive (a merge every MERGE_ROWS rows)...
        await store.append("folded", update_of(f"f{n}"))
    await wait_until(lambda: _table_counts(store)[1] > 3, what="the copy")
    await store.append("folded", update_of("f7"))  # ...and rows in recent only
    await store.append_many("fresh", [(update_of("x"), "a"), (update_of("y"), "a")])  # in recent only
    rooms = ["folded", "fresh", "nothing", "folded"]
    alone = [await store.load(room) for room in rooms]
    hops = count_hops(store, monkeypatch)
    together = await asyncio.gather(*(store.load(room) for room in rooms))
    assert hops["reader"] == 1
    assert together == alone
    assert alone[0].snapshot is not None and len(alone[0].updates) == 5 and alone[1].snapshot is None
    assert len(alone[1].updates) == 2 and alone[2] == RoomState(None, [], 0, 0)


async def test_a_failed_batched_load_fails_each_waiter_and_the_next_load_reads_again(opened) -> None:
    store = await opened()
    await store.append("r", update_of("kept"))
    await store._reader.close()  # the reader breaks under the waiting loads
    results = await asyncio.gather(*(store.load(room) for room in ("r", "s", "r")), return_exceptions=True)
    assert all(isinstance(result, StoreError) for result in results)
    state = await store.load("r")  # the reader is checked, found broken and reconnected
    assert text_of_store_state(state.snapshot, state.updates) == "kept"


async def test_a_failed_batch_is_rolled_back_whole_and_the_writer_carries_on(opened) -> None:
    store = await opened()
    with sqlite3.connect(store.path) as db:  # the database refuses some rows half-way through
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON recent WHEN NEW.room = 'bad' "
                   "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    async with store._write_lock:  # the writer is busy meanwhile: both appends form one batch
        appends = asyncio.gather(
            store.append_many("good", [(update_of(f"g{n}"), "a") for n in range(5)]),
            store.append("bad", update_of("b")),
            return_exceptions=True,
        )
        await wait_until(lambda: store._enqueued == 6)
    results = await appends
    assert all(isinstance(r, StoreError) for r in results), results
    assert "refused" in str(results[0])
    assert _table_counts(store) == (0, 0)
    with sqlite3.connect(store.path) as probe:
        assert probe.execute("SELECT count(*) FROM rooms").fetchone() == (0,)
        assert not probe.in_transaction
    assert await store.append("good", update_of("ok")) > 0
    assert await store.rooms() == ["good"]  # the failed batch did not mark the room as known


async def test_a_failed_append_many_leaves_no_unretrieved_errors(opened, monkeypatch: pytest.MonkeyPatch) -> None:
    # append_many raises the failure; no other future's failure may be left unretrieved,
    # or asyncio logs "Future exception was never retrieved" for each when it is collected.
    store = await opened()
    assert store._writer is not None
    await store._writer.execute("PRAGMA query_only = ON")
    from storage import groupcommit

    queued: list[groupcommit.Pending] = []
    real = groupcommit.Pending

    def recording(*args: object) -> groupcommit.Pending:
        queued.append(real(*args))  # type: ignore[arg-type]
        return queued[-1]

    monkeypatch.setattr(groupcommit, "Pending", recording)
    with pytest.raises(StoreError):
        await store.append_many("r", [(update_of(f"u{n}"), None) for n in range(5)])
    await asyncio.sleep(0)  # the done callbacks run
    assert len(queued) == 5
    # One future per append_many call (shared by its updates) or one per update: every one of
    # them is done and its error counts as retrieved.
    created = list({id(f): f for f in (p.future if p.group is None else p.group.future for p in queued)}.values())
    assert created and all(f.done() for f in created)
    # asyncio's own flag for "log this exception when collected", cleared once it was looked at
    # (checked before anything here looks at them).
    assert not any(getattr(f, "_log_traceback", False) for f in created)
    assert all(isinstance(f.exception(), StoreError) for f in created)


async def test_commits_are_paced_under_load_but_light_load_goes_at_once(opened) -> None:
    # With a (deliberately long) 1 s commit interval. Light load — one append at a time — is
    # committed at once, every time:
    store = await opened(commit_interval=1.0)
    await asyncio.wait_for(store.append("r", update_of("first")), 0.9)
    await asyncio.wait_for(store.append("r", update_of("second")), 0.9)
    assert store.commits == 2
    # A crowd of 10 arriving together: the first starts a commit at once, the other 9 share the
    # next. That batch of 9 marks the store busy; the appends that follow, one per loop turn
    # (without pacing the first of them would be committed on its own at once, see below),
    # then share one commit after the interval.
    await asyncio.gather(*(store.append("r", update_of(f"crowd {n}")) for n in range(10)))
    assert store.commits == 4
    later = []
    for n in range(20):
        later.append(asyncio.create_task(store.append("r", update_of(f"later {n}"))))
        await asyncio.sleep(0)  # one loop turn: the next producer arrives after this one
    ids = await asyncio.gather(*later)
    assert ids == sorted(ids) and len(set(ids)) == 20
    assert store.commits == 5


def test_a_paced_commit_waits_on_one_timer_under_uvloop(tmp_path: Path) -> None:
    # The server runs on uvloop, whose clock and timers count whole milliseconds: a pacing wait
    # of a fraction of a millisecond fired on the next loop iteration, found the clock unmoved
    # and armed the timer again -- the event loop spun until the millisecond turned. Counted
    # here: timers armed per paced commit (one wait each), in the loop the server uses.
    uvloop = pytest.importorskip("uvloop")
    armed = 0

    class CountingLoop(uvloop.Loop):  # type: ignore[misc, name-defined]
        def call_later(self, delay, callback, *args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal armed
            armed += 1
            return super().call_later(delay, callback, *args, **kwargs)

    async def paced_rounds() -> tuple[int, int]:
        store = SQLiteStore(tmp_path / "collab.db", commit_interval=0.002)
        await store.open()
        try:
            # Each round of 5 appends (enough to pace the next commit) arrives as soon as the
            # previous round's commit is done, within 2 ms of its start: it waits out the rest.
            await asyncio.gather(*(store.append("r", update_of(f"warm {n}")) for n in range(5)))
            before_armed, before_commits = armed, store.commits
            for round_ in range(60):
                await asyncio.gather(*(store.append("r", update_of(f"{round_}.{n}")) for n in range(5)))
            return armed - before_armed, store.commits - before_commits
        finally:
            await store.close()

    with asyncio.Runner(loop_factory=CountingLoop) as runner:
        timers, commits = runner.run(paced_rounds())
    assert commits >= 60  # every round waited for its own commit
    # At most two timers per paced wait (a 1.4 ms rest is a 1 ms timer, then the remainder),
    # and a few for anything else. The spinning wait armed ~10,000 for these 60 commits.
    assert timers <= 2 * commits + 10, f"{timers} timers armed for {commits} commits"


async def test_without_pacing_each_spread_out_append_commits_on_its_own(opened) -> None:
    # The control for the test above: commit_interval=0 commits as soon as possible.
    store = await opened(commit_interval=0)
    await asyncio.gather(*(store.append("r", update_of(f"crowd {n}")) for n in range(10)))
    later = []
    for n in range(20):
        later.append(asyncio.create_task(store.append("r", update_of(f"later {n}"))))
        await wait_until(lambda: later[-1].done(), what="the commit")
    assert store.commits == 2 + 20


def test_commit_interval_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SQLiteStore(tmp_path / "x.db", commit_interval=-1)
    with pytest.raises(ValueError):
        SQLiteStore(tmp_path / "x.db", commit_interval=5)


async def test_append_rows_stores_several_rooms_in_one_commit_or_nothing(opened) -> None:
    store = await opened()
    rows = [("a", update_of("a1"), "ann"), ("b", update_of("b1"), None), ("a", update_of("a2"), "ann")]
    ids = await store.append_rows(rows)
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert store.commits == 1
    assert [u.data for u in await store.history("a")] == [rows[0][1], rows[2][1]]
    assert [u.author for u in await store.history("a")] == ["ann", "ann"]
    # one bad row refuses the whole call before anything is queued
    with pytest.raises(ValueError):
        await store.append_rows([("a", update_of("a3"), None), ("b", b"", None)])
    assert len(await store.history("a")) == 2 and store.commits == 1


# -- recent rows: appends land in an unindexed table and move to ``updates`` in bulk -------------


def _table_counts(store: SQLiteStore) -> tuple[int, int]:
    """Rows in the main file's ``recent`` and in the archive's ``updates``."""
    with sqlite3.connect(store.path) as probe:
        recent = probe.execute("SELECT count(*) FROM recent").fetchone()[0]
    with sqlite3.connect(store.archive_path) as probe:
        updates = probe.execute("SELECT count(*) FROM updates").fetchone()[0]
    return recent, updates


async def test_recent_rows_move_in_bulk_and_every_read_sees_them_the_same(
        opened, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage_sqlite, "MERGE_ROWS", 5)
    store = await opened()
    a = [update_of(f"a{n}") for n in range(4)]
    b = [update_of(f"b{n}") for n in range(4)]
    ids = await store.append_many("a", [(u, "x") for u in a[:3]])
    assert _table_counts(store) == (3, 0)  # below the count: only ``recent`` written
    ids += await store.append_many("b", [(u, "y") for u in b[:3]])
    # The batch that reached 5 rows is reported first, then everything is copied to the archive
    # in one transaction, off the writer; the copies stay in ``recent`` until the next batch.
    await wait_until(lambda: _table_counts(store) == (6, 6), what="the copy")
    assert [r.id for r in await store.history("a")] == ids[:3]  # copies are read once
    assert (await store.load("b")).updates == b[:3]
    ids += await store.append_many("a", [(a[3], "x")])
    assert _table_counts(store) == (1, 6)  # that batch deleted the copies; room a is in both files
    assert ids == sorted(ids) and len(set(ids)) == 7

    history = await store.history("a")
    assert [(r.id, r.data, r.author) for r in history] == list(zip(ids[:3] + ids[6:], a, "xxxx"))
    assert [r.id for r in await store.history("a", after_id=ids[1], limit=2)] == [ids[2], ids[6]]
    assert [r.id for r in await store.history("a", before_id=ids[6])] == ids[:3]
    assert (await store.load("a")).updates == a

    await store.close()  # ids go on from both tables' rows after a restart
    store = await opened()
    later = await store.append("b", b[3])
    assert later > ids[-1]
    assert [r.id for r in await store.history("b")] == ids[3:6] + [later]
    assert (await store.load("b")).updates == b


@pytest.mark.parametrize("keep", [2, 4, 20])
async def test_compaction_folds_rows_still_in_recent_and_keeps_history_keep_rows(
    opened, monkeypatch: pytest.MonkeyPatch, keep: int
) -> None:
    """Compaction folds every row, those still only in ``recent`` too, without moving them to the
    archive -- unless pruning must reach them (more of them than ``history_keep``): then they are
    archived first. Either way history_keep counts the newest rows of both files."""
    monkeypatch.setattr(storage_sqlite, "MERGE_ROWS", 6)
    store = await opened(history_keep=keep)
    doc = pycrdt.Doc()
    text = doc.get("t", type=pycrdt.Text)
    typed = []
    for n in range(9):  # one writer typing: each update follows the previous one
        before = doc.get_state()
        text += f"u{n}"
        typed.append((doc.get_update(before), "a"))
    ids = await store.append_many("r", typed[:3])
    ids += await store.append_many("r", typed[3:6])
    await wait_until(lambda: _table_counts(store) == (6, 6), what="the copy")
    ids += await store.append_many("r", typed[6:])
    assert _table_counts(store) == (3, 6)  # ids[6:] only in recent
    assert await store.compact("r")
    assert [r.id for r in await store.history("r")] == ids[-keep:]
    merged = keep < 3  # pruning had to reach the 3 unarchived rows
    # Merged: the last 3 archived, their copies go with the next batch. Not merged: they stay in
    # recent, and the archive keeps what history_keep leaves for it.
    assert _table_counts(store) == ((3, keep) if merged else (3, min(keep - 3, 6)))
    state = await store.load("r")
    assert state.updates == [] and text_of_store_state(state.snapshot, []) == "".join(f"u{n}" for n in range(9))
    late_update = update_of("later")
    later = await store.append("r", late_update)
    assert _table_counts(store) == ((1, keep) if merged else (4, min(keep - 3, 6)))
    assert [r.id for r in await store.history("r")] == ids[-keep:] + [later]
    state = await store.load("r")  # the folded rows still in recent are not read as tail
    assert state.updates == [late_update] and state.last_id == later

    # The next merge archives them; reads and history stay the same.
    await store.append_many("r", [(update_of(f"m{n}"), "a") for n in range(6)])
    await wait_until(lambda: _table_counts(store)[1] > min(keep, 6), what="the next merge")
    kept = ids[-keep:] + [later]
    assert [r.id for r in await store.history("r")][:len(kept)] == kept
    assert len((await store.load("r")).updates) == 7


async def test_a_version_3_file_gets_recent_and_its_ids_go_on(opened, tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "collab.db") as db:  # as the previous release left it
        for version in (1, 2, 3):
            for statement in MIGRATIONS[version]:
                db.execute(statement)
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (3)")
        db.execute("INSERT INTO updates (id, room, data, author, ts) VALUES (41, 'r', ?, 'old', 1.0)",
                   (update_of("old"),))
        db.execute("DELETE FROM updates")  # pruned: the sequence still remembers 41
        db.execute("INSERT INTO rooms VALUES ('r', 1.0)")
    store = await opened()
    assert await store.append("r", update_of("new")) == 42


def _version_4_file(path: Path, *, snapshot: bytes, archived: list[bytes], recent: list[bytes]) -> None:
    """A file as the previous release (schema version 4) left it: one room with a snapshot up to
    id 10, rows 11.. in ``updates`` and the newest rows still in ``recent``."""
    with sqlite3.connect(path) as db:
        for version in (1, 2, 3, 4):
            for statement in MIGRATIONS[version]:
                db.execute(statement)
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (4)")
        db.execute("INSERT INTO rooms VALUES ('r', 1.0)")
        db.execute("INSERT INTO snapshots VALUES ('r', ?, 10, 1.0)", (snapshot,))
        for n, data in enumerate(archived, start=11):
            db.execute("INSERT INTO updates (id, room, data, author, ts) VALUES (?, 'r', ?, 'old', 1.0)", (n, data))
        for n, data in enumerate(recent, start=11 + len(archived)):
            db.execute("INSERT INTO recent (id, room, data, author, ts) VALUES (?, 'r', ?, 'new', 2.0)", (n, data))


async def test_a_version_4_file_moves_its_log_to_the_archive_and_reads_the_same(opened, tmp_path: Path) -> None:
    doc = pycrdt.Doc()
    text = doc.get("t", type=pycrdt.Text)
    text += "snap"
    snapshot = doc.get_update()
    typed = []
    for n in range(5):
        before = doc.get_state()
        text += f"-{n}"
        typed.append(doc.get_update(before))
    _version_4_file(tmp_path / "collab.db", snapshot=snapshot, archived=typed[:3], recent=typed[3:])

    store = await opened()
    state = await store.load("r")
    assert text_of_store_state(state.snapshot, state.updates) == "snap-0-1-2-3-4"
    assert (state.last_id, state.updates) == (15, typed)
    history = await store.history("r")
    assert [(r.id, r.author) for r in history] == [(11, "old"), (12, "old"), (13, "old"), (14, "new"), (15, "new")]
    with sqlite3.connect(store.path) as probe:  # the main file keeps only what is new
        tables = {name for (name,) in probe.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "updates" not in tables and "snapshots" not in tables and "recent" in tables
        assert probe.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert _table_counts(store) == (2, 3)
    assert await store.append("r", update_of("after")) == 16  # ids go on

    await store.close()  # a second start migrates nothing again and reads the same
    store = await opened()
    assert [r.id for r in await store.history("r")] == [11, 12, 13, 14, 15, 16]
    assert await store.compact("r")
    state = await store.load("r")
    folded = text_of_store_state(state.snapshot, [])
    assert state.updates == [] and "snap-0-1-2-3-4" in folded and "after" in folded


async def test_a_version_4_migration_cut_off_after_the_archive_commit_is_done_again(
        opened, tmp_path: Path) -> None:
    """The archive's copy commits before the main file drops its tables: a crash in between
    leaves both, and the next start copies again without doubling anything."""
    typed = [update_of(f"u{n}") for n in range(4)]
    _version_4_file(tmp_path / "collab.db", snapshot=update_of("s"), archived=typed[:2], recent=typed[2:])
    archive = tmp_path / ("collab.db" + storage_sqlite.ARCHIVE_SUFFIX)
    with sqlite3.connect(archive) as db:  # the first half of an earlier, interrupted migration
        for statement in storage_sqlite.ARCHIVE_SCHEMA:
            db.execute(statement)
        db.execute("INSERT INTO updates VALUES (11, 'r', ?, 'old', 1.0)", (typed[0],))
    store = await opened()
    assert [(r.id, r.data) for r in await store.history("r")] == list(zip(range(11, 15), typed))


async def test_group_commits_go_on_while_the_archive_is_locked(opened, monkeypatch: pytest.MonkeyPatch) -> None:
    """Merges and compaction write the archive on their own connection: while another process
    holds the archive's write lock (or a merge takes long), appends still commit and every read
    still sees them; the merge completes once the lock is released."""
    monkeypatch.setattr(storage_sqlite, "MERGE_ROWS", 5)
    store = await opened()
    lock = sqlite3.connect(store.archive_path, timeout=0)
    lock.execute("BEGIN IMMEDIATE")
    try:
        ids = []
        for n in range(6):
            ids += await store.append_many(f"room-{n % 2}", [(update_of(f"{n}-{k}"), None) for k in range(3)])
        assert store._merge_task is not None and not store._merge_task.done()  # waiting for the lock
        assert _table_counts(store) == (18, 0)
        assert [r.id for r in await store.history("room-0")] == [i for n in (0, 2, 4) for i in ids[3 * n:3 * n + 3]]
    finally:
        lock.rollback()
        lock.close()
    await wait_until(lambda: _table_counts(store)[1] == 18, what="the merge after the lock")
    await store.append("room-1", update_of("next"))
    assert _table_counts(store) == (1, 18)
    assert len(await store.history("room-1")) == 10


# -- the writer process ----------------------------------------------------------------------------


async def test_the_writer_process_commits_each_batch_and_ends_with_the_store(opened, tmp_path: Path) -> None:
    store = await opened(writer="process")
    assert store._process is not None and store._process.alive
    child = store._process.proc
    assert running(child.pid) and child.pid != os.getpid()
    ids = await asyncio.gather(*(store.append(f"room{n % 3}", update_of(f"u{n}"), author="a") for n in range(50)))
    assert sorted(ids) == ids == list(range(ids[0], ids[0] + 50))  # one id each, in queue order
    assert store.commits < 50  # grouped, as in-process

    # Another connection sees the rows: they were committed by the child, not held in memory here.
    with sqlite3.connect(store.path) as probe:
        count, = probe.execute("SELECT count(*) FROM recent WHERE author = 'a'").fetchone()
        rooms = {row[0] for row in probe.execute("SELECT name FROM rooms")}
    assert count == 50 and rooms == {"room0", "room1", "room2"}
    assert text_of_store_state(None, (await store.load("room1")).updates).count("u") == 17

    await store.close()
    assert child.returncode == 0  # reaped, and it exited on its own (EOF), not killed


async def test_a_killed_writer_process_fails_its_batch_and_is_replaced(opened) -> None:
    store = await opened(writer="process")
    before = await store.append("r", update_of("before"))
    assert store._process is not None
    first = store._process.proc
    first.kill()
    await asyncio.to_thread(first.wait, 10)

    # Appends after the death: the batch the dead child was sent fails (StoreError), none hangs;
    # then a new child takes over.
    results = await append_many(store, 20)
    assert all(isinstance(r, (int, StoreError)) for r in results), results
    await wait_until(lambda: store._process is not None and store._process.alive and store._process.proc is not first,
                     what="a new writer process")
    after = await store.append("r", update_of("after"))
    assert store._process.proc is not first and running(store._process.proc.pid)

    stored = {row.id for row in await store.history("r", limit=100)}
    kept = [r for r in results if isinstance(r, int)]
    assert {before, after, *kept} <= stored
    assert after > max([before, *kept])


async def test_ctrl_c_to_the_writer_process_does_not_cut_a_commit(opened) -> None:
    # Ctrl-C in a terminal signals the whole process group: the server drains, then closes the
    # child's socket; the child itself ignores SIGINT.
    store = await opened(writer="process")
    assert store._process is not None
    child = store._process.proc
    os.kill(child.pid, signal.SIGINT)
    ids = await asyncio.gather(*(store.append("r", update_of(f"u{n}")) for n in range(10)))
    assert len(set(ids)) == 10 and store._process.proc is child and running(child.pid)


async def test_a_writer_process_that_cannot_start_leaves_the_store_writing_in_process(
    opened, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A child that exits at once, before it says ready (a broken interpreter, a full process table).
    monkeypatch.setattr(sys, "executable", "/bin/false")
    store = await opened(writer="process")
    assert store._process is None
    assert "cannot start the SQLite writer process" in caplog.text
    ids = await asyncio.gather(*(store.append("r", update_of(f"u{n}")) for n in range(10)))
    assert len(set(ids)) == 10  # written by the in-process writer meanwhile

    monkeypatch.undo()  # the interpreter is back: the next batch after the retry delay starts a child
    monkeypatch.setattr(storage_sqlite, "WRITER_PROCESS_RETRY", 0.0)
    store._process_retry_at = 0.0
    await store.append("r", update_of("restart"))
    await wait_until(lambda: store._process is not None and store._process.alive, what="the writer process")
    assert await store.append("r", update_of("by the child")) > max(ids)


def test_writer_must_be_thread_or_process(tmp_path: Path) -> None:
    assert open_store(f"sqlite://{tmp_path}/x.db?writer=process").writer_mode == "process"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="writer"):
        open_store(f"sqlite://{tmp_path}/x.db?writer=fork")


async def test_reads_of_recent_start_above_the_merged_rows_and_still_see_every_row(
        opened, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loads, history and compaction read ``recent`` from the last ``merged.upto`` the store saw
    (a rowid range, not a scan of the copies): they return exactly what a store that has seen no
    merge reads -- and so does a store whose floor is past ``merged.upto`` (the files replaced
    under it), which reads ``recent`` again from the start."""
    monkeypatch.setattr(storage_sqlite, "MERGE_ROWS", 4)
    store = await opened()
    for n in range(10):  # rows 1..10: merges after rows 4 and 8
        await store.append("a" if n % 2 else "b", update_of(f"u{n}"))
    await wait_until(lambda: store._merged_floor >= 8, what="a merge the store saw")
    await store.append("a", update_of("last"))  # row 11: only in ``recent`` (no merge is due)

    async def reads(s: SQLiteStore) -> tuple:
        return (await s.load("a"), await s.load("b"), [r.id for r in await s.history("a")],
                [r.id for r in await s.history("b", after_id=2)])

    seen = await reads(store)
    fresh = SQLiteStore(store.path)  # has seen no merge: reads ``recent`` whole
    await fresh.open()
    try:
        assert fresh._merged_floor == 0
        assert await reads(fresh) == seen
    finally:
        await fresh.close()
    text = text_of_store_state(seen[0].snapshot, seen[0].updates)  # independent inserts, any order
    pieces = ["last", *(f"u{n}" for n in range(1, 11, 2))]
    assert all(piece in text for piece in pieces) and len(text) == sum(map(len, pieces))
    assert len(seen[2]) == 6 and len(seen[1].updates) == 5 and len(seen[3]) == 4

    store._merged_floor = 10**9  # past anything: every read must fall back to all of ``recent``
    assert await reads(store) == seen
    assert await store.compact("a")
    state = await store.load("a")
    assert text_of_store_state(state.snapshot, state.updates) == text_of_store_state(
        seen[0].snapshot, seen[0].updates)
