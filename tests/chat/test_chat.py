"""Chat end to end: real server processes, the Python SDK, two nodes over a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from clients import CollabClient, Room, YClient
from clients.chat import ChatForbidden, NotFound, RateLimited, RoomChat, TooLong
from collab import protocol
from collab.auth import issue_token
SECRET = "chat-test-secret-0123456789abcdef"
from servers import RedisServer, wait_until

FAST = {"node_timeout_seconds": 2, "resync_seconds": 2, "log_level": "info"}


@contextlib.asynccontextmanager
async def joined(url: str, room: str, *, name: str | None = None, token: str | None = None) -> AsyncIterator:
    async with CollabClient(url, token=token, params={"name": name} if name else None,
                            backoff_initial=0.05, backoff_max=0.5) as client:
        # What ``CollabClient.join`` does, with the chat attached before the socket opens (as the
        # SDK's ``Room.__init__`` should): the history pushed on join must find its handler.
        r = Room(client, room)
        r.chat = RoomChat(r)
        client.rooms[room] = r
        r._start()
        await r.wait_synced(10)
        yield r


def collect(chat: RoomChat) -> list:
    events: list = []
    chat.on_event(events.append)
    return events


async def test_two_clients_on_two_nodes_chat_live_and_forged_authors_are_ignored(server_factory, tmp_path):
    async with RedisServer(tmp_path / "redis") as redis:
        store = str(tmp_path / "shared.db")
        n1, n2 = [await server_factory(data_dir=tmp_path / f"n{i}", store=store, redis=redis.url, **FAST)
                  for i in range(2)]
        async with joined(n1.url, "team/doc", name="Ada") as ada, joined(n2.url, "team/doc", name="Bob") as bob:
            seen_by_bob = collect(bob.chat)
            sent = await ada.chat.send("hello from node 1")
            assert sent.author.id == "dev:Ada" and sent.author.name == "Ada" and sent.text == "hello from node 1"
            await wait_until(lambda: any(e.message.id == sent.id for e in seen_by_bob), what="cross-node delivery")
            assert seen_by_bob[-1].kind == "message"

            # Forged author, id and time fields are ignored: the token (here: dev name) decides.
            reply = await ada.request({"type": "chat.send", "text": "forged", "author": {"id": "dev:Bob", "name": "Bob"},
                                       "message": {"author": "dev:Bob"}, "ts": 1, "message_id": "0" * 26})
            forged = reply["message"]
            assert forged["author"] == {"id": "dev:Ada", "name": "Ada"} and forged["ts"] > 1000
            assert forged["id"] != "0" * 26

            answer = await bob.chat.send("hi back", reply_to=sent.id)
            assert answer.reply_to == sent.id
            page = await ada.chat.history()
            assert [(m.author.name, m.text) for m in page] == [("Ada", "hello from node 1"), ("Ada", "forged"),
                                                               ("Bob", "hi back")]
            assert page.messages == sorted(page.messages, key=lambda m: m.id)


async def test_history_after_reconnect_and_restart_with_pagination(server_factory, tmp_path):
    srv = await server_factory()
    ids = []
    for user in ("Ada", "Bob", "Cleo"):
        async with joined(srv.url, "paged", name=user) as r:
            for i in range(8):
                ids.append((await r.chat.send(f"{user} {i}")).id)
    assert ids == sorted(ids)

    async with joined(srv.url, "paged", name="Dan") as dan:
        pushed = await dan.chat.wait_joined()
        assert [m.id for m in pushed] == ids  # fewer than the 50 pushed on join
        assert not pushed.has_more
        newest = await dan.chat.history(limit=10)
        assert [m.id for m in newest] == ids[-10:] and newest.has_more
        older = await dan.chat.history(limit=10, before=newest.messages[0].id)
        assert [m.id for m in older] == ids[-20:-10] and older.has_more
        oldest = await dan.chat.history(limit=10, before=older.messages[0].id)
        assert [m.id for m in oldest] == ids[:4] and not oldest.has_more

    http = await srv.get("/api/rooms/paged/chat?limit=5")
    assert http.status_code == 200
    body = http.json()
    assert [m["id"] for m in body["messages"]] == ids[-5:] and body["has_more"] and body["next_before"] == ids[-5]
    body = (await srv.get(f"/api/rooms/paged/chat?limit=50&before={ids[2]}")).json()
    assert [m["id"] for m in body["messages"]] == ids[:2] and not body["has_more"]

    await srv.stop()
    await srv.start()
    async with joined(srv.url, "paged", name="Eve") as eve:
        assert [m.id for m in await eve.chat.wait_joined()] == ids
        assert [m.text for m in await eve.chat.history(limit=3)] == ["Cleo 5", "Cleo 6", "Cleo 7"]


async def test_edit_and_delete_permissions(server_factory):
    srv = await server_factory(secret=SECRET)
    alice = issue_token(SECRET, user="alice", name="Alice", role="editor")
    bob = issue_token(SECRET, user="bob", name="Bob", role="viewer")
    carol = issue_token(SECRET, user="carol", name="Carol", role="viewer")
    async with joined(srv.url, "perm", token=alice) as a, joined(srv.url, "perm", token=bob) as b, \
            joined(srv.url, "perm", token=carol) as c:
        by_alice = await a.chat.send("alice says")
        by_bob = await b.chat.send("viewers may comment")  # viewers can chat
        by_carol = await c.chat.send("carol says")
        carol_sees = collect(c.chat)

        with pytest.raises(ChatForbidden):
            await b.chat.edit(by_alice.id, "bob rewrites alice")
        with pytest.raises(ChatForbidden):
            await a.chat.edit(by_bob.id, "even editors cannot rewrite others")
        with pytest.raises(ChatForbidden):
            await b.chat.delete(by_carol.id)  # a viewer cannot delete someone else's message

        edited = await b.chat.edit(by_bob.id, "viewers may comment (edited)")
        assert edited.text == "viewers may comment (edited)" and edited.edited_ts is not None
        tomb = await a.chat.delete(by_bob.id)  # an editor may delete any message
        assert tomb.deleted and tomb.text == "" and tomb.author.id == "bob"
        own = await c.chat.delete(by_carol.id)  # anyone may delete their own
        assert own.deleted
        with pytest.raises(NotFound):
            await b.chat.edit(by_bob.id, "too late")
        with pytest.raises(NotFound):
            await b.chat.edit("01ZZZZZZZZZZZZZZZZZZZZZZZZ", "nothing")

        await wait_until(lambda: [e.kind for e in carol_sees] == ["updated", "deleted", "deleted"], what="pushes")
        reacted = await c.chat.react(by_alice.id, "👍")
        assert reacted.reactions == {"👍": ("carol",)}
        assert (await b.chat.react(by_alice.id, "👍")).reactions == {"👍": ("carol", "bob")}
        assert (await c.chat.react(by_alice.id, "👍")).reactions == {"👍": ("bob",)}

    history = (await srv.get(f"/api/rooms/perm/chat?token={carol}")).json()["messages"]
    assert [(m["author"]["id"], m["text"], m["deleted"]) for m in history] == [
        ("alice", "alice says", False), ("bob", "", True), ("carol", "", True)]
    async with httpx.AsyncClient() as http:
        assert (await http.get(srv.http + "/api/rooms/perm/chat")).status_code == 401
        other = issue_token(SECRET, user="dan", rooms=["other/*"])
        r = await http.get(srv.http + "/api/rooms/perm/chat", headers={"Authorization": f"Bearer {other}"})
        assert r.status_code == 403


async def test_over_length_and_over_rate_are_refused_without_dropping_the_connection(server_factory):
    srv = await server_factory()
    async with joined(srv.url, "limits", name="Flood") as r:
        with pytest.raises(TooLong) as too_long:
            await r.chat.send("x" * 4001)
        assert too_long.value.body["max_chars"] == 4000
        assert (await r.chat.send("y" * 4000)).text == "y" * 4000  # exactly the limit is fine

        # The burst is 10 writes per user; the two sends above (refused or not) took two.
        accepted, refused = 0, 0
        for i in range(15):
            try:
                await r.chat.send(f"burst {i}")
                accepted += 1
            except RateLimited as exc:
                refused += 1
                assert exc.retry_after > 0
        assert 8 <= accepted <= 9 and refused == 15 - accepted  # 1/s refill: at most one more
        assert r.connected and r.connects == 1
        assert len(await r.chat.history(limit=50)) == 1 + accepted  # reads are not rate-limited
        r.text().insert(0, "still editing")
        async with YClient(srv.url, "limits") as other:
            assert other.text() == "still editing"


async def test_an_anchored_message_follows_concurrent_edits(server_factory):
    srv = await server_factory()
    async with joined(srv.url, "anchored", name="Ada") as ada, joined(srv.url, "anchored", name="Bob") as bob:
        text = ada.text()
        text.insert(0, "hello world")
        await wait_until(lambda: str(bob.text()) == "hello world", what="sync")
        sent = await ada.chat.send("this word", anchor=ada.chat.anchor(text, 6, 11))
        assert (sent.anchor["from"], sent.anchor["to"]) == (6, 11)

        bob.text().insert(0, "big ")          # before the anchor: it moves
        text.insert(len(str(text)), "!!!")    # after: it does not
        await wait_until(lambda: str(ada.text()) == str(bob.text()) == "big hello world!!!", what="edits")
        await wait_until(lambda: _anchor_via_http(srv, "anchored", (10, 15)), what="server to apply the edits")
        [message] = (await bob.chat.history()).messages
        assert (message.anchor["from"], message.anchor["to"]) == (10, 15)
        assert str(bob.text())[10:15] == "world"

        bob.text().insert(10, "whole ")  # inside the range, at its start: the range still starts at "world"
        await wait_until(lambda: _anchor_via_http(srv, "anchored", (16, 21)), what="anchor to follow")

    async with httpx.AsyncClient() as http:  # room unloaded or not: resolved against the stored doc
        body = (await http.get(srv.http + "/api/rooms/anchored/chat")).json()
        assert (body["messages"][0]["anchor"]["from"], body["messages"][0]["anchor"]["to"]) == (16, 21)


async def _anchor_via_http(srv, room: str, expected: tuple[int, int]) -> bool:
    messages = (await srv.get(f"/api/rooms/{room}/chat")).json()["messages"]
    anchor = messages[0]["anchor"]
    return (anchor["from"], anchor["to"]) == expected


async def test_a_mention_appears_in_the_mentioned_users_list_until_read(server_factory):
    srv = await server_factory(secret=SECRET)
    ada_token = issue_token(SECRET, user="u-ada", name="Ada Lovelace")
    bob_token = issue_token(SECRET, user="u-bob", name="Bob", role="viewer")
    async with joined(srv.url, "mentions", token=bob_token) as bob:
        await bob.chat.wait_joined()  # Bob has been in the room: he is a known user now
    async with joined(srv.url, "mentions", token=ada_token) as ada:
        sent = await ada.chat.send("@bob could you check this? cc @Ada Lovelace")
        assert sent.mentions == ("u-bob",)  # self-mentions do not notify
        other = await ada.chat.send("@u-bob by id works too")
        assert other.mentions == ("u-bob",)
        await ada.chat.send("@nobody is not a user here")

    async with httpx.AsyncClient() as http:
        url = srv.http + "/api/users/u-bob/mentions"
        listed = (await http.get(url, headers={"Authorization": f"Bearer {bob_token}"})).json()["mentions"]
        assert [(m["room"], m["message"]["id"], m["read"]) for m in listed] == [
            ("mentions", other.id, False), ("mentions", sent.id, False)]
        assert listed[1]["message"]["author"] == {"id": "u-ada", "name": "Ada Lovelace"}
        assert (await http.get(url, headers={"Authorization": f"Bearer {ada_token}"})).status_code == 403
        assert (await http.get(url)).status_code == 401

    async with joined(srv.url, "mentions", token=bob_token) as bob:
        assert await bob.chat.mark_read(sent.id) == 1
    async with httpx.AsyncClient() as http:
        listed = (await http.get(url, params={"token": bob_token})).json()["mentions"]
        assert [m["message"]["id"] for m in listed] == [other.id]
        r = await http.post(url + "/read", json={"room": "mentions", "upto": other.id},
                            headers={"Authorization": f"Bearer {bob_token}"})
        assert r.json() == {"marked": 1}
        assert (await http.get(url, params={"token": bob_token})).json()["mentions"] == []
        everything = (await http.get(url, params={"token": bob_token, "all": "1"})).json()["mentions"]
        assert [m["read"] for m in everything] == [True, True]


async def test_raw_extension_frames_get_error_replies_not_closes(server_factory):
    srv = await server_factory()
    async with YClient(srv.url, "raw") as client:
        replies: list[dict] = []
        original = client._handle

        def handle(frame: bytes) -> None:
            if frame and frame[0] == protocol.MSG_EXTENSION:
                import json
                payload, _ = protocol.read_var_bytes(frame, 1)
                replies.append(json.loads(payload))
            original(frame)

        client._handle = handle  # type: ignore[method-assign]
        for body in ({"type": "chat.send", "id": 1}, {"type": "chat.send", "id": 2, "text": "a", "anchor": "x"},
                     {"type": "chat.edit", "id": 3, "message_id": 5, "text": "b"},
                     {"type": "chat.react", "id": 4, "message_id": "m", "emoji": ""},
                     {"type": "chat.history", "id": 5, "limit": -1}, {"type": "chat.send", "id": [1]}):
            await client.send_raw(protocol.encode_extension(body))
        await client.send_raw(protocol.encode_extension({"type": "chat.send", "id": 6, "text": "fine"}))
        await wait_until(lambda: any(r.get("id") == 6 for r in replies), what="replies")
        errors = {r.get("id"): r["code"] for r in replies if r["type"] == "error"}
        assert errors == {1: "bad-request", 2: "bad-request", 3: "bad-request", 4: "bad-request",
                          5: "bad-request", None: "bad-request"}
        assert not client.closed.is_set()


WEB_SCRIPT = r"""
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'
const { attachChat, ChatError } = await import(process.argv[1])
const [url, room] = process.argv.slice(2)
const doc = new Y.Doc()
const provider = new WebsocketProvider(url, room, doc, { WebSocketPolyfill: WebSocket, params: { name: 'Web' } })
const chat = attachChat(provider)
const pushed = new Promise((resolve) => chat.on('history', resolve))
const live = new Promise((resolve) => chat.on('message', resolve))
await new Promise((resolve) => provider.on('sync', (s) => s && resolve()))
const text = doc.getText('text')
text.insert(0, 'hello world')
const history = await pushed
const sent = await chat.send('from the browser', { anchor: chat.anchorRange(Y, text, 6, 11) })
const echoed = await live
let refused = null
try { await chat.send('x'.repeat(4001)) } catch (err) { refused = err instanceof ChatError ? err.code : String(err) }
const page = await chat.history({ limit: 10 })
console.log(JSON.stringify({ history, sent, echoed, refused, page }))
provider.destroy()
process.exit(0)
"""


async def test_the_web_module_speaks_chat_over_the_providers_socket(server_factory):
    from yjs import NODE_DIR

    srv = await server_factory()
    async with joined(srv.url, "web", name="Py") as py:
        await py.chat.send("from python")
    module = NODE_DIR.parents[1] / "clients" / "web" / "chat.js"
    proc = await asyncio.create_subprocess_exec(
        "node", "--input-type=module", "-e", WEB_SCRIPT, module.as_uri(), srv.url, "web", cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-2000:]
    import json
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert [m["text"] for m in result["history"]["messages"]] == ["from python"]
    assert result["sent"]["author"] == {"id": "dev:Web", "name": "Web"}
    assert (result["sent"]["anchor"]["from"], result["sent"]["anchor"]["to"]) == (6, 11)
    assert result["echoed"]["id"] == result["sent"]["id"]
    assert result["refused"] == "too-long"
    assert [m["text"] for m in result["page"]["messages"]] == ["from python", "from the browser"]
