"""Joiners become known chat users (for @mentions) without a write transaction each.

Each transaction is a commit in line with the documents' group commits; one per join held every
document edit back for seconds when a thousand clients reconnected at once. Here the database is
held locked by another process while a crowd joins, as a slow disk would: every joiner must still
be stored, in a couple of transactions, not one each."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence

from clients import CollabClient, YClient
from servers import InProcessServer, wait_until
from storage import SQLiteStore

CROWD = 40


class CountingStore(SQLiteStore):
    """The real SQLite store, noting the size of each known-users write and each message written."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.user_writes: list[int] = []
        self.messages = 0

    async def chat_add(self, message) -> None:  # type: ignore[no-untyped-def]
        self.messages += 1
        await super().chat_add(message)

    async def chat_put_users(self, users: Sequence[tuple[str, str, str]]) -> None:
        self.user_writes.append(len(users))
        await super().chat_put_users(users)


async def test_a_crowd_joining_is_stored_as_known_users_in_a_few_transactions(tmp_path):
    store = CountingStore(tmp_path / "collab.db", busy_timeout=30)
    async with InProcessServer(tmp_path, store=store) as srv:
        lock = sqlite3.connect(tmp_path / "collab.db", timeout=0)
        lock.execute("BEGIN EXCLUSIVE")  # the disk stalls while everyone joins
        clients = [YClient(srv.url, "crowd", params={"name": f"user{n}"}) for n in range(CROWD)]
        try:
            await asyncio.gather(*(client.connect() for client in clients))
            await wait_until(lambda: len(store.user_writes) >= 1, timeout=10, what="the first write")
        finally:
            lock.rollback()
            lock.close()
        try:
            async def all_known() -> dict[str, str]:
                users = await store.chat_users("crowd")
                return users if len(users) == CROWD else {}

            users = await wait_until(all_known, timeout=20, what="every joiner stored")
            assert users == {f"dev:user{n}": f"user{n}" for n in range(CROWD)}
            assert sum(store.user_writes) == CROWD
            # The first joiner's write waited on the lock; everyone after it queued meanwhile.
            assert len(store.user_writes) <= 3, store.user_writes
        finally:
            await asyncio.gather(*(client.close() for client in clients))


async def test_a_returning_user_is_not_written_again(tmp_path):
    store = CountingStore(tmp_path / "collab.db")
    async with InProcessServer(tmp_path, store=store) as srv:
        async def joins(name: str) -> None:
            async with YClient(srv.url, "again", params={"name": name}) as client:
                await client.wait_synced()

        await joins("Ada")
        await wait_until(lambda: store.chat_users("again"), timeout=10, what="Ada stored")
        await joins("Ada")
        await joins("Ada")
        await joins("Bob")  # written after anything the returning Ada would have queued

        async def bob_known() -> bool:
            return "dev:Bob" in await store.chat_users("again")

        await wait_until(bob_known, timeout=10, what="Bob stored")
        assert await store.chat_users("again") == {"dev:Ada": "Ada", "dev:Bob": "Bob"}
        assert sum(store.user_writes) == 2, store.user_writes


async def test_a_joiner_whose_write_is_still_waiting_on_the_disk_can_be_mentioned(tmp_path):
    """Known users leave the queue when their batch's write starts; until it commits, @mentions
    must still find them (they did not: a mention right after a join could miss its user)."""
    store = CountingStore(tmp_path / "collab.db", busy_timeout=30)
    async with InProcessServer(tmp_path, store=store) as srv:
        lock = sqlite3.connect(tmp_path / "collab.db", timeout=0)
        lock.execute("BEGIN EXCLUSIVE")  # the disk stalls: Bob's write waits in flight
        try:
            async with CollabClient(srv.url, params={"name": "Bob"}) as bob:
                await (await bob.join("flight")).chat.wait_joined()
            await wait_until(lambda: store.user_writes == [1], timeout=10, what="Bob's write to start")
            async with CollabClient(srv.url, params={"name": "Ada"}) as ada:
                room = await ada.join("flight")
                await room.chat.wait_joined()
                sending = asyncio.ensure_future(room.chat.send("@Bob have a look"))
                # Its mentions are resolved before the message is written (which waits too).
                await wait_until(lambda: store.messages == 1, timeout=10, what="the message write to start")
                lock.rollback()
                sent = await asyncio.wait_for(sending, 20)
        finally:
            lock.rollback()
            lock.close()
        assert sent.mentions == ("dev:Bob",)

        async def both_stored() -> bool:
            return await store.chat_users("flight") == {"dev:Bob": "Bob", "dev:Ada": "Ada"}

        await wait_until(both_stored, timeout=10, what="both stored once the disk is back")
