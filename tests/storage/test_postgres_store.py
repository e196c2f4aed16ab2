"""PostgreSQL-only behaviour: URLs, migration races, several stores and OS processes on one room,
kill -9, compaction across nodes, terminated connections and an unreachable server.

The contract suite (test_store_contract.py) runs against PostgreSQL too; these add what only a
shared, networked database can get wrong. Fixtures ``postgres_db`` / ``postgres_url`` come from
conftest (a fresh database per session, a fresh schema per test; failing loudly if the server is
down).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import asyncpg
import pycrdt
import pytest

from servers import wait_until
from storage import PostgresStore, StoreError, open_store
from storage.postgres import LOCK_APPEND, LOCK_COMPACT, SCHEMA_VERSION, lock_key

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("store_worker.py")
COMMITTED = re.compile(r"committed (\d+) (\S+) (\S+)")
TOKEN = re.compile(r"<[a-z0-9]+:\d+>")


def update_of(text: str) -> bytes:
    doc = pycrdt.Doc()
    doc.get("t", type=pycrdt.Text).insert(0, text)
    return doc.get_update()


def text_of_store_state(snapshot: bytes | None, updates: list[bytes]) -> str:
    doc = pycrdt.Doc()
    for update in ([snapshot] if snapshot else []) + updates:
        doc.apply_update(update)
    return str(doc.get("t", type=pycrdt.Text))


def schema_of(url: str) -> str:
    match = re.search(r"schema=(\w+)", url)
    assert match
    return match[1]


@pytest.fixture
async def opened(postgres_url: str):
    stores: list[PostgresStore] = []

    async def factory(url: str = postgres_url, **options) -> PostgresStore:
        store = open_store(url, **options)
        assert isinstance(store, PostgresStore)
        await store.open()
        stores.append(store)
        return store

    yield factory
    for store in stores:
        await store.close()


@pytest.fixture
async def admin(postgres_db: str):
    """A plain connection to the test database, outside any store (another node, a DBA)."""
    conn = await asyncpg.connect(postgres_db)
    yield conn
    await conn.close()


class CursorReader:
    """A reader that pages through a room with ``after_id`` like a catching-up node would.

    If a room's ids ever committed out of order (id n visible before some m < n), this reader
    would have moved past m and never see it: comparing what it saw with the final rows catches it.
    """

    def __init__(self, store, room: str) -> None:
        self.store, self.room = store, room
        self.seen: list[int] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        while True:
            stopping = self.stop.is_set()
            page = await self.store.history(self.room, after_id=max(self.seen, default=0))
            self.seen.extend(row.id for row in page)
            if stopping and not page:
                return


async def all_ids(store, room: str) -> list[int]:
    ids: list[int] = []
    while page := await store.history(room, after_id=max(ids, default=0), limit=10_000):
        ids.extend(row.id for row in page)
    return ids


# -- URLs, setup, migration --------------------------------------------------------------------


def test_urls_and_options() -> None:
    store = open_store(
        "postgresql://user:s3cret@db.example:6432/collab?schema=c1&pool_size=2&history_keep=0"
        "&command_timeout=5&sslmode=disable&synchronous=normal"
    )
    assert isinstance(store, PostgresStore)
    assert (store.schema, store.pool_size, store.history_keep, store.command_timeout) == (
        "c1", 2, 0, 5.0
    )
    assert store.synchronous == "NORMAL"
    assert store.dsn == "postgresql://user:s3cret@db.example:6432/collab?sslmode=disable"
    assert "s3cret" not in repr(store) and "db.example:6432/collab" in repr(store)
    assert open_store("postgres://u@h/db", history_keep=5).history_keep == 5  # type: ignore[attr-defined]
    for bad in ("postgresql://h/db?schema=a-b", "postgresql://h/db?schema=x;drop",
                "postgresql://h/db?pool_size=0", "postgresql://h/db?synchronous=off",
                "postgresql:relative", "postgresql://h/db?history_keep=-1"):
        with pytest.raises(ValueError):
            open_store(bad)


async def test_an_unreachable_server_is_a_store_error() -> None:
    store = open_store("postgresql://postgres@127.0.0.1:1/nothing", connect_timeout=2)
    with pytest.raises(StoreError, match="cannot open PostgreSQL store") as caught:
        await store.open()
    assert isinstance(caught.value.__cause__, OSError)
    await store.close()


async def test_many_processes_opening_a_new_schema_migrate_once(opened, admin) -> None:
    stores = await asyncio.gather(*(opened() for _ in range(8)))  # 8 pools: 8+ sessions racing
    schema = stores[0].schema
    assert await admin.fetch(f'SELECT version FROM "{schema}".schema_version') == [
        (SCHEMA_VERSION,)
    ]
    tables = await admin.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
        schema,
    )
    assert [t[0] for t in tables] == ["chat_mentions", "chat_messages", "chat_users", "meta", "rooms", "schema_version",
                                      "snapshots", "updates"]
    ids = await asyncio.gather(*(s.append("r", update_of(f"{n}")) for n, s in enumerate(stores)))
    assert len(set(ids)) == 8


async def test_a_newer_schema_is_refused(opened, admin) -> None:
    store = await opened()
    await admin.execute(f'UPDATE "{store.schema}".schema_version SET version = 99')
    with pytest.raises(StoreError, match="schema version 99"):
        await opened()


async def test_synchronous_normal_relaxes_only_the_appends(opened) -> None:
    full = await opened()
    assert full._writer is not None
    assert await full._writer.fetchval("SHOW synchronous_commit") == "on"
    normal = await opened(synchronous="NORMAL")
    assert normal._writer is not None and normal._pool is not None
    assert await normal._writer.fetchval("SHOW synchronous_commit") == "off"
    async with normal._pool.acquire() as conn:  # metadata and compaction stay fully durable
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
    assert await normal.append("r", update_of("x")) > 0


# -- several stores and processes on one room ---------------------------------------------------


async def test_three_stores_appending_to_one_room_keep_committed_ids_a_prefix(opened) -> None:
    a, b, c, watcher = await opened(), await opened(), await opened(), await opened()
    readers = [CursorReader(watcher, "r") for _ in range(2)]
    reading = [asyncio.create_task(reader.run()) for reader in readers]
    returned: dict[str, list[int]] = {}

    async def writer(store: PostgresStore, name: str) -> None:
        returned[name] = [
            await store.append("r", update_of(f"{name}:{n}"), author=name) for n in range(40)
        ]

    stores = {"a": a, "b": b, "c": c}
    await asyncio.gather(*(writer(s, f"{name}{k}") for name, s in stores.items() for k in range(20)))
    for reader in readers:
        reader.stop.set()
    await asyncio.gather(*reading)

    everything = await all_ids(watcher, "r")
    assert len(everything) == 3 * 20 * 40 == len(set(everything))
    assert sorted(i for ids in returned.values() for i in ids) == everything
    for ids in returned.values():  # each writer's updates in its own order
        assert ids == sorted(ids)
    for reader in readers:  # no id ever appeared behind one already visible
        assert reader.seen == everything
    assert all(s.commits < 20 * 40 / 5 for s in stores.values())  # group commit


async def spawn(url: str, name: str, *args: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(WORKER), url, "room", name, *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
    assert line == b"ready 0\n", line  # no writer process: that is SQLite's
    return process


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


async def test_processes_appending_to_one_room_lose_nothing_and_keep_ids_ordered(
    postgres_url: str, opened
) -> None:
    watcher = await opened()
    workers = [await spawn(postgres_url, name, "--tasks", "8", "--count", "60")
               for name in ("p", "q")]
    reader = CursorReader(watcher, "room")
    reading = asyncio.create_task(reader.run())
    go(*workers)
    outputs = await asyncio.wait_for(asyncio.gather(*(w.communicate() for w in workers)), 60)
    reader.stop.set()
    await reading
    assert [w.returncode for w in workers] == [0, 0]

    reported: dict[int, tuple[str, str]] = {}
    for stdout, _ in outputs:
        assert stdout.endswith(b"done\n")
        reported.update(committed(stdout))
    assert len(reported) == 2 * 8 * 60  # ids unique across processes
    per_writer: dict[str, list[int]] = {}
    for update_id, (writer, _) in sorted(reported.items()):
        per_writer.setdefault(writer, []).append(update_id)
    for writer, ids in per_writer.items():  # sorted by id == the order the writer appended
        tokens = [reported[i][1] for i in ids]
        assert tokens == [f"<{writer}:{n}>" for n in range(60)]
    everything = await all_ids(watcher, "room")
    assert everything == sorted(reported)
    assert reader.seen == everything  # committed ids stayed a prefix while both processes wrote
    state = await watcher.load("room")
    assert sorted(TOKEN.findall(text_of_store_state(state.snapshot, state.updates))) == sorted(
        token for _, token in reported.values()
    )


@pytest.mark.parametrize("history_keep", [0, 50])
async def test_processes_compacting_one_room_lose_nothing(
    postgres_url: str, opened, history_keep: int
) -> None:
    url = f"{postgres_url}&history_keep={history_keep}"
    workers = [
        await spawn(url, name, "--tasks", "4", "--count", "60", "--compact-every", "5")
        for name in ("p", "q")
    ]
    go(*workers)
    outputs = await asyncio.wait_for(asyncio.gather(*(w.communicate() for w in workers)), 90)
    assert [w.returncode for w in workers] == [0, 0]
    reported: dict[int, tuple[str, str]] = {}
    compactions: list[str] = []
    for stdout, _ in outputs:
        reported.update(committed(stdout))
        compactions += re.findall(r"compacted (True|False)", stdout.decode())
    assert len(reported) == 2 * 4 * 60 and len(compactions) == 2 * 4 * 12
    assert "True" in compactions

    store = await opened(url)
    state = await store.load("room")
    tokens = TOKEN.findall(text_of_store_state(state.snapshot, state.updates))
    assert sorted(tokens) == sorted(token for _, token in reported.values())
    assert state.last_id == max(reported)
    rows = await all_ids(store, "room")
    assert len(rows) <= history_keep + len(state.updates)


async def test_kill_9_loses_no_reported_commit(postgres_url: str, opened) -> None:
    worker = await spawn(postgres_url, "k", "--tasks", "8", "--count", "-1")
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

    store = await opened()
    rows = {}
    while page := await store.history("room", after_id=max(rows, default=0)):
        rows.update((row.id, row) for row in page)
    for update_id, (author, _) in reported.items():
        assert rows[update_id].author == author
    state = await store.load("room")
    text = text_of_store_state(state.snapshot, state.updates)
    assert all(token in text for _, token in reported.values())


# -- compaction across nodes -------------------------------------------------------------------


async def test_compaction_of_a_room_runs_on_one_node_at_a_time(
    opened, admin, postgres_url: str
) -> None:
    store = await opened()
    for n in range(5):
        await store.append("r", update_of(f"{n}"))
    key = lock_key(schema_of(postgres_url), "r")
    assert await admin.fetchval("SELECT pg_try_advisory_lock($1, $2)", LOCK_COMPACT, key)
    try:
        assert await store.compact("r") is False  # another node is compacting "r"
        assert len((await store.load("r")).updates) == 5
        for n in range(3):
            await store.append("other", update_of(f"{n}"))
        assert await store.compact("other") is True  # other rooms are not blocked
    finally:
        await admin.execute("SELECT pg_advisory_unlock($1, $2)", LOCK_COMPACT, key)
    assert await store.compact("r") is True
    assert (await store.load("r")).updates == []


async def test_a_compactor_killed_mid_way_does_not_block_the_room(opened, admin) -> None:
    store = await opened()
    for n in range(5):
        await store.append("r", update_of(f"{n}"))
    # A session holding the compaction lock dies (crashed node): PostgreSQL drops its locks.
    holder = await asyncpg.connect(store.dsn.split("?")[0])
    key = lock_key(store.schema or "", "r")
    assert await holder.fetchval("SELECT pg_try_advisory_lock($1, $2)", LOCK_COMPACT, key)
    assert await store.compact("r") is False
    holder.terminate()
    await wait_until(lambda: store.compact("r"), timeout=5, interval=0.05,
                     what="the room unlocked after its compactor died")
    assert (await store.load("r")).updates == []


# -- failures ------------------------------------------------------------------------------------


async def wait_for_lock_waiters(admin: asyncpg.Connection, count: int) -> None:
    async def queued() -> bool:
        waiting = await admin.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        )
        return waiting >= count

    await wait_until(queued, timeout=5, interval=0.01, what="the store's writer queued for the room lock")


async def terminate_other_backends(admin: asyncpg.Connection) -> int:
    return await admin.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )


async def test_terminated_connections_fail_pending_appends_then_recover(opened, admin) -> None:
    store = await opened()
    first = await store.append("r", update_of("before"))
    assert await store.get_meta("r", "k") is None  # the pool has a live connection too

    # Another node holds room "r"'s append lock, so the next batch is in flight (waiting on it)
    # when every connection of the store is terminated.
    await admin.execute(
        "SELECT pg_advisory_lock($1, $2)", LOCK_APPEND, lock_key(store.schema or "", "r")
    )
    pending = [asyncio.create_task(store.append("r", update_of(f"lost{n}"))) for n in range(20)]
    await wait_for_lock_waiters(admin, 1)
    assert await terminate_other_backends(admin) >= 2  # the writer and the pool's connection
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
    assert all(isinstance(r, StoreError) for r in results), results
    assert isinstance(results[0].__cause__, (asyncpg.PostgresError, asyncpg.InterfaceError, OSError))
    await admin.execute("SELECT pg_advisory_unlock_all()")

    # Later appends, reads and metadata succeed on fresh connections.
    later = [await store.append("r", update_of(f"later{n}")) for n in range(5)]
    assert later == sorted(later) and later[0] > first
    await store.ping()
    state = await store.load("r")
    assert len(state.updates) == 6 and state.last_id == later[-1]
    await store.put_meta("r", "k", b"v")
    assert await store.get_meta("r", "k") == b"v"
    assert await store.compact("r")


async def test_a_batch_draws_ids_and_records_rooms_only_once_its_rooms_are_locked(opened, admin) -> None:
    # The batch is one statement; its ids must still be drawn after the room's lock (committed ids
    # stay a prefix), and its new rooms recorded after it too (two batches inserting one new room
    # each while waiting for the other's lock would deadlock). While another node holds room "n",
    # a batch for "n" must have done neither.
    store, other = await opened(), await opened()
    before = await store.append("r", update_of("before"))
    await admin.execute(
        "SELECT pg_advisory_lock($1, $2)", LOCK_APPEND, lock_key(store.schema or "", "n")
    )
    try:
        blocked = asyncio.create_task(store.append_many("n", [(update_of(f"n{n}"), None) for n in range(3)]))
        await wait_for_lock_waiters(admin, 1)
        elsewhere = await other.append("s", update_of("s"))
        assert elsewhere == before + 1  # no id was drawn for "n"
        async with admin.transaction():  # no uncommitted "n" row to wait for
            await admin.execute("SET LOCAL lock_timeout = '2s'")
            await admin.execute(
                f'INSERT INTO "{store.schema}".rooms VALUES (\'n\', 0) ON CONFLICT DO NOTHING')
            await admin.execute(f'DELETE FROM "{store.schema}".rooms WHERE name = \'n\'')
        assert not blocked.done()
    finally:
        await admin.execute("SELECT pg_advisory_unlock_all()")
    assert await asyncio.wait_for(blocked, 10) == [elsewhere + 1, elsewhere + 2, elsewhere + 3]
    assert await store.rooms() == ["n", "r", "s"]


async def test_a_failed_batch_leaves_nothing_behind(opened, admin) -> None:
    # One statement, one transaction: a row the database refuses takes the whole batch with it,
    # rooms included, and the writer carries on.
    store = await opened()
    schema = store.schema
    await admin.execute(f"""
        CREATE FUNCTION "{schema}".refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'refused'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON "{schema}".updates
        FOR EACH ROW WHEN (NEW.room = 'bad') EXECUTE FUNCTION "{schema}".refuse();
    """)
    store.max_pending = 1_000
    results = await asyncio.gather(
        store.append_many("good", [(update_of(f"g{n}"), "a") for n in range(5)]),
        store.append("bad", update_of("b")),
        return_exceptions=True,
    )
    assert all(isinstance(r, StoreError) for r in results), results
    assert await admin.fetchval(f'SELECT count(*) FROM "{schema}".updates') == 0
    assert await store.rooms() == []
    assert await store.append("good", update_of("ok")) > 0
    assert await store.rooms() == ["good"]


async def test_reads_survive_a_restart_of_every_connection(opened, admin) -> None:
    store = await opened(pool_size=2)
    await store.append("r", update_of("x"))
    await asyncio.gather(store.load("r"), store.load("r"))  # two pooled connections, both idle
    await terminate_other_backends(admin)
    assert len((await store.load("r")).updates) == 1  # stale pooled connections are replaced
    await store.ping()
    assert await store.append("r", update_of("y")) > 0


async def test_a_stuck_lock_fails_the_batch_after_command_timeout(opened, admin) -> None:
    store = await opened(command_timeout=0.5)
    await admin.execute(
        "SELECT pg_advisory_lock($1, $2)", LOCK_APPEND, lock_key(store.schema or "", "r")
    )
    try:
        with pytest.raises(StoreError, match="commit failed"):
            await asyncio.wait_for(store.append("r", update_of("stuck")), 10)
        assert await store.append("elsewhere", update_of("free")) > 0  # other rooms flow
    finally:
        await admin.execute("SELECT pg_advisory_unlock_all()")
    assert await store.append("r", update_of("free again")) > 0
    assert len((await store.load("r")).updates) == 1


async def test_close_waits_for_the_queue_then_releases_every_connection(
    opened, admin, postgres_url: str
) -> None:
    store = await opened(f"{postgres_url}&application_name=closing-node")
    await asyncio.gather(store.load("r"), store.load("r"), store.compact("r"))
    tasks = [asyncio.create_task(store.append("r", update_of(f"{n}"))) for n in range(50)]
    await asyncio.sleep(0)

    async def connections() -> int:
        return await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'closing-node'"
        )

    assert await connections() >= 2  # the writer and the pool
    await store.close()
    assert all(isinstance(t.result(), int) for t in tasks)
    # the server ends a backend just after its client said goodbye
    await wait_until(lambda: _is_zero(connections()), timeout=5, what="no connection left")
    assert await connections() == 0


async def _is_zero(count) -> bool:
    return await count == 0
