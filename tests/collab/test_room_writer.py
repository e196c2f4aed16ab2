"""The hub's room writer: every room's updates of a round stored in one group commit, then relayed.

What users rely on when storage fails under them (here: another process holds the SQLite database
locked past the store's busy timeout — a real failure, not a mock): nothing that was not stored is
relayed; the rooms whose updates were in the failed commit are closed with 1013 and reload from
storage, where the clients' own sync re-sends what was lost; rooms with nothing in that commit
carry on undisturbed; and when storage is back, everything converges."""

from __future__ import annotations

import sqlite3

import pycrdt

from clients import YClient
from servers import InProcessServer, wait_until
from storage import SQLiteStore


async def test_a_failed_commit_closes_only_its_rooms_and_nothing_unstored_is_relayed(tmp_path):
    store = SQLiteStore(tmp_path / "collab.db", busy_timeout=0.2)
    async with InProcessServer(tmp_path, store=store) as srv:
        writer_doc = pycrdt.Doc()
        writer = await YClient(srv.url, "failing", doc=writer_doc).connect()
        watcher = await YClient(srv.url, "failing").connect()
        bystander = await YClient(srv.url, "quiet").connect()
        bystander_peer = await YClient(srv.url, "quiet").connect()
        try:
            writer.doc.get("text", type=pycrdt.Text).insert(0, "stored")
            await watcher.wait_for(lambda: watcher.text() == "stored", timeout=10, what="first edit")

            lock = sqlite3.connect(tmp_path / "collab.db", timeout=0)
            lock.execute("BEGIN EXCLUSIVE")  # another process holds the database
            try:
                writer.doc.get("text", type=pycrdt.Text).insert(6, " and lost")
                assert (await writer.wait_closed(timeout=10))[0] == 1013
                assert (await watcher.wait_closed(timeout=10))[0] == 1013
                assert watcher.text() == "stored"  # the unstored edit was never relayed
                assert not bystander.closed.is_set() and not bystander_peer.closed.is_set()
            finally:
                lock.rollback()
                lock.close()

            # The room that had nothing in the failed commit goes on as if nothing happened.
            bystander.doc.get("text", type=pycrdt.Text).insert(0, "still here")
            await bystander_peer.wait_for(lambda: bystander_peer.text() == "still here", timeout=10,
                                          what="the other room still relays")

            # The writer reconnects with its document: its sync re-sends the lost edit, now stored.
            await writer.close()
            async with YClient(srv.url, "failing", doc=writer_doc):
                async with YClient(srv.url, "failing") as fresh:
                    await fresh.wait_for(lambda: fresh.text() == "stored and lost", timeout=10,
                                         what="the lost edit, re-sent and stored")
        finally:
            for client in (writer, watcher, bystander, bystander_peer):
                await client.close()


async def test_a_commit_stalled_longer_than_the_backlog_bound_then_catches_up(tmp_path):
    """A commit that waits on the disk (here: another process holds the database, within the
    busy timeout) while editing goes on: the next round holds more updates than the store lets
    be in flight at once (``max_pending``). It is written in steps, and every edit is relayed
    and stored -- the server does not stop committing (it did: the round waited for room that
    only its own, never started, rows could make)."""
    store = SQLiteStore(tmp_path / "collab.db", busy_timeout=30, max_pending=4)
    async with InProcessServer(tmp_path, store=store) as srv:
        writer = await YClient(srv.url, "stalled").connect()
        watcher = await YClient(srv.url, "stalled").connect()
        try:
            text = writer.doc.get("text", type=pycrdt.Text)
            text.insert(0, "a")
            await watcher.wait_for(lambda: watcher.text() == "a", timeout=10, what="first edit")
            received = srv.hub.metrics.updates_in
            lock = sqlite3.connect(tmp_path / "collab.db", timeout=0)
            lock.execute("BEGIN EXCLUSIVE")  # the disk stalls
            try:
                before = received.value
                for n in range(40):
                    text.insert(len(str(text)), str(n % 10))
                await wait_until(lambda: received.value >= before + 40, timeout=10, what="40 edits received")
                assert watcher.text() == "a"  # nothing relayed before it is stored
            finally:
                lock.rollback()
                lock.close()
            expected = str(text)
            await watcher.wait_for(lambda: watcher.text() == expected, timeout=20, what="every edit relayed")
        finally:
            await writer.close()
            await watcher.close()
        assert len(await store.history("stalled")) == 41
