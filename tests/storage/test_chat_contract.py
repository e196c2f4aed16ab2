"""The chat part of the Store contract, run against every backend (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from storage import Store, open_store
from storage.chat import MAX_CHAT_PUT_USERS, MAX_CHAT_REACTIONS, ChatMessage
from storage.sqlite import MIGRATIONS


def msg(n: int, room: str = "r", *, author: str = "alice", text: str | None = None, **extra) -> ChatMessage:
    return ChatMessage(id=f"{n:026d}", room=room, author=author, author_name=author.title(),
                       text=text if text is not None else f"message {n}", ts=1000.0 + n, **extra)


async def test_a_message_round_trips_with_every_field(store: Store) -> None:
    original = msg(1, reply_to="00000000000000000000000000", anchor='{"start":{"assoc":0}}',
                   mentions=("bob",), text="hi @bob ✨")
    await store.chat_add(original)
    assert await store.chat_get("r", original.id) == original
    assert await store.chat_get("r", "nope") is None
    assert await store.chat_get("other", original.id) is None


async def test_history_pages_back_from_the_newest(store: Store) -> None:
    for n in range(1, 8):
        await store.chat_add(msg(n))
    await store.chat_add(msg(99, room="elsewhere"))
    page = await store.chat_history("r", limit=3)
    assert [m.text for m in page] == ["message 5", "message 6", "message 7"]
    page = await store.chat_history("r", before=page[0].id, limit=3)
    assert [m.text for m in page] == ["message 2", "message 3", "message 4"]
    page = await store.chat_history("r", before=page[0].id, limit=3)
    assert [m.text for m in page] == ["message 1"]
    assert await store.chat_history("empty") == []


async def test_a_duplicate_id_is_refused(store: Store) -> None:
    await store.chat_add(msg(1))
    with pytest.raises(ValueError, match="already exists"):
        await store.chat_add(msg(1, text="again"))
    assert (await store.chat_get("r", msg(1).id)).text == "message 1"


@pytest.mark.parametrize("bad", [
    {"text": ""}, {"text": "nul\0"}, {"author": ""}, {"id": "x" * 65}, {"mentions": tuple(f"u{i}" for i in range(51))},
])
async def test_bad_messages_are_refused_before_writing(store: Store, bad: dict) -> None:
    base = msg(1)
    fields = {**base.__dict__, **bad}
    with pytest.raises(ValueError):
        await store.chat_add(ChatMessage(**fields))
    assert await store.chat_history("r") == []


async def test_edit_replaces_text_and_mentions_keeping_read_marks(store: Store) -> None:
    await store.chat_add(msg(1, mentions=("bob", "carol")))
    assert await store.chat_mark_read("bob", "r", msg(1).id) == 1
    edited = await store.chat_edit("r", msg(1).id, "fixed @bob @dave", mentions=("bob", "dave"), edited_ts=5.0)
    assert edited is not None and edited.text == "fixed @bob @dave" and edited.edited_ts == 5.0
    assert edited.mentions == ("bob", "dave")
    assert [m.read for m in await store.chat_mentions("bob", unread_only=False)] == [True]
    assert await store.chat_mentions("carol") == []
    assert [m.message.id for m in await store.chat_mentions("dave")] == [msg(1).id]
    assert await store.chat_edit("r", "missing", "x") is None


async def test_delete_leaves_a_tombstone_without_text(store: Store) -> None:
    await store.chat_add(msg(1, anchor='{"a":1}', mentions=("bob",), text="secret"))
    await store.chat_react("r", msg(1).id, "👍", "bob")
    tomb = await store.chat_delete("r", msg(1).id)
    assert tomb is not None and tomb.deleted and tomb.text == "" and tomb.anchor is None
    assert tomb.reactions == {} and tomb.mentions == () and tomb.author == "alice" and tomb.ts == 1001.0
    assert await store.chat_mentions("bob", unread_only=False) == []
    assert (await store.chat_history("r"))[0] == tomb
    assert await store.chat_delete("r", msg(1).id) == tomb  # idempotent
    assert await store.chat_edit("r", msg(1).id, "back") is None
    assert await store.chat_react("r", msg(1).id, "👍", "bob") is None
    assert await store.chat_delete("r", "missing") is None


async def test_deleted_text_is_gone_from_the_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    async with open_store(str(path)) as store:
        await store.chat_add(msg(1, text="needle-7f3a"))
        await store.chat_delete("r", msg(1).id)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert db.execute("SELECT count(*) FROM chat_messages WHERE text LIKE '%needle%'").fetchone() == (0,)


async def test_reactions_toggle_per_user(store: Store) -> None:
    await store.chat_add(msg(1))
    await store.chat_react("r", msg(1).id, "👍", "bob")
    await store.chat_react("r", msg(1).id, "👍", "carol")
    message = await store.chat_react("r", msg(1).id, "🎉", "bob")
    assert message.reactions == {"👍": ("bob", "carol"), "🎉": ("bob",)}
    message = await store.chat_react("r", msg(1).id, "👍", "bob")
    message = await store.chat_react("r", msg(1).id, "🎉", "bob")
    assert message.reactions == {"👍": ("carol",)}


async def test_concurrent_reactions_are_not_lost(store: Store) -> None:
    await store.chat_add(msg(1))
    await asyncio.gather(*(store.chat_react("r", msg(1).id, "👍", f"u{i}") for i in range(12)))
    assert len((await store.chat_get("r", msg(1).id)).reactions["👍"]) == 12


async def test_distinct_reactions_are_bounded(store: Store) -> None:
    await store.chat_add(msg(1))
    for i in range(MAX_CHAT_REACTIONS):
        await store.chat_react("r", msg(1).id, f"e{i}", "bob")
    with pytest.raises(ValueError, match="at most"):
        await store.chat_react("r", msg(1).id, "one-too-many", "bob")


async def test_mentions_span_rooms_newest_first_and_can_be_marked_read(store: Store) -> None:
    await store.chat_add(msg(1, room="a", mentions=("bob",)))
    await store.chat_add(msg(2, room="b", mentions=("bob", "carol")))
    await store.chat_add(msg(3, room="a", mentions=("bob",)))
    await store.chat_add(msg(4, room="a"))
    mentions = await store.chat_mentions("bob")
    assert [(m.message.room, m.message.id, m.read) for m in mentions] == [
        ("a", msg(3).id, False), ("b", msg(2).id, False), ("a", msg(1).id, False)]
    assert [m.message.id for m in await store.chat_mentions("bob", before=msg(3).id, limit=1)] == [msg(2).id]
    assert await store.chat_mark_read("bob", "a", msg(1).id) == 1
    assert [m.message.id for m in await store.chat_mentions("bob")] == [msg(3).id, msg(2).id]
    assert [m.read for m in await store.chat_mentions("bob", unread_only=False)] == [False, False, True]
    assert await store.chat_mark_read("bob", "a", msg(9).id) == 1
    assert await store.chat_mark_read("bob", "a", msg(9).id) == 0
    assert [m.user for m in await store.chat_mentions("carol")] == ["carol"]


async def test_known_users_are_remembered_per_room_with_their_latest_name(store: Store) -> None:
    await store.chat_put_user("r", "u1", "Ada")
    await store.chat_put_user("r", "u2", "Bob")
    await store.chat_put_user("r", "u1", "Ada L.")
    await store.chat_put_user("other", "u3", "Cleo")
    assert await store.chat_users("r") == {"u1": "Ada L.", "u2": "Bob"}
    assert await store.chat_users("nobody") == {}


async def test_known_users_are_written_in_batches_all_or_nothing(store: Store) -> None:
    await store.chat_put_users([("r", "u1", "Ada"), ("r", "u2", "Bob"), ("s", "u1", "Ada"), ("r", "u1", "Ada L.")])
    assert await store.chat_users("r") == {"u1": "Ada L.", "u2": "Bob"}  # the last entry wins
    assert await store.chat_users("s") == {"u1": "Ada"}
    await store.chat_put_users([])
    for bad in ([("t", "u3", "Cleo"), ("t", "", "nobody")], [("t", "u3", "Cleo"), ("", "u4", "Dan")],
                [("t", f"u{n}", "x") for n in range(MAX_CHAT_PUT_USERS + 1)]):
        with pytest.raises(ValueError):
            await store.chat_put_users(bad)
        assert await store.chat_users("t") == {}  # checked before anything is written


async def test_chat_survives_reopening(store: Store, open_new) -> None:
    await store.chat_add(msg(1, mentions=("bob",)))
    await store.close()
    again = await open_new()
    assert [m.text for m in await again.chat_history("r")] == ["message 1"]
    assert len(await again.chat_mentions("bob")) == 1


async def test_a_version_2_sqlite_file_gains_chat_in_place(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    with sqlite3.connect(path) as db:  # as the previous release left it
        for version in (1, 2):
            for statement in MIGRATIONS[version]:
                db.execute(statement)
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (2)")
        db.execute("INSERT INTO meta VALUES ('r', 'owner', x'61', 1.0)")
    async with open_store(str(path)) as store:
        assert await store.get_meta("r", "owner") == b"a"
        await store.chat_add(msg(1))
        assert len(await store.chat_history("r")) == 1
