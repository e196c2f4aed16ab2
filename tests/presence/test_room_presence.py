"""RoomPresence without sockets: stamping, ownership, coalescing, rate limit, sessions, peers."""

from __future__ import annotations

import itertools
import json

import pytest

from collab import protocol
from collab.auth import Identity
from collab.protocol import AwarenessEntry, ProtocolError
from presence.config import PresenceSettings
from presence.room import RoomPresence, pack_awareness, unpack_awareness
from presence.stamp import color_for

from servers import wait_until

_ids = itertools.count(1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeMember:
    def __init__(self, user: str, role: str = "editor", name: str | None = None) -> None:
        self.id = f"c{next(_ids)}"
        self.identity = Identity(user_id=user, name=name or user.title(), role=role, rooms=("*",))  # type: ignore[arg-type]
        self.connected_at = 1000.0
        self.frames: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)

    def received(self) -> list[AwarenessEntry]:
        out = []
        for frame in self.frames:
            message = protocol.decode(frame)
            out += list(message.entries)
        return out


class Harness:
    def __init__(self, flush_ms: float = 0, **kw) -> None:
        self.clock = FakeClock()
        self.members: list[FakeMember] = []
        self.published: list[bytes] = []
        self.rejected = 0
        self.presence = RoomPresence(broadcast=self.broadcast, publish=self.published.append, clock=self.clock,
                                     on_rejected=self._reject)
        self.presence.configure(PresenceSettings(flush_ms=flush_ms, **kw), room="doc")

    def _reject(self, n: int) -> None:
        self.rejected += n

    def broadcast(self, frame: bytes, exclude) -> None:
        for m in self.members:
            if m is not exclude:
                m.send(frame)

    def join(self, member: FakeMember) -> FakeMember:
        self.members.append(member)
        self.presence.on_join(member)
        return member

    def leave(self, member: FakeMember) -> None:
        self.members.remove(member)
        self.presence.on_leave(member)


def entry(cid: int, clock: int, state) -> AwarenessEntry:
    return AwarenessEntry(cid, clock, json.dumps(state))


def test_state_is_stamped_with_the_connections_identity():
    h = Harness()
    alice, bob = h.join(FakeMember("alice")), h.join(FakeMember("bob", role="viewer"))
    h.presence.on_message(alice, (entry(1, 1, {"user": {"name": "Mallory", "color": "#ABC"}, "cursor": 5}),))
    h.presence.on_message(bob, (entry(2, 1, {"user": {"name": "Eve", "color": "red; x"}}),))
    (got,) = [e for e in bob.received() if e.client_id == 1]
    state = json.loads(got.state)
    assert state["cursor"] == 5
    assert state["user"] == {"id": "alice", "name": "Alice", "color": "#aabbcc", "colorLight": "#aabbcc33",
                             "role": "editor"}
    state = json.loads(h.presence.awareness.get(2).state)
    assert state["user"]["name"] == "Bob" and state["user"]["readOnly"] is True
    assert state["user"]["color"] == color_for("bob")  # an invalid colour is replaced


def test_states_that_browsers_cannot_parse_are_not_relayed():
    h = Harness()
    alice, bob = h.join(FakeMember("alice")), h.join(FakeMember("bob"))
    h.presence.on_message(alice, (AwarenessEntry(1, 1, '{"x": NaN}'), AwarenessEntry(2, 1, "[1]")))
    assert bob.received() == [] and len(h.presence.awareness) == 0


def test_writing_another_users_client_id_is_refused_but_echoes_are_not_counted():
    h = Harness()
    alice, bob = h.join(FakeMember("alice")), h.join(FakeMember("bob"))
    h.presence.on_message(alice, (entry(1, 3, {"a": 1}),))
    relayed = next(e for e in bob.received() if e.client_id == 1)
    h.presence.on_message(bob, (relayed,))  # a stock client's echo: same clock
    assert h.rejected == 0
    h.presence.on_message(bob, (entry(1, 4, {"evil": 1}), AwarenessEntry(1, 9, "null")))
    assert h.rejected == 2
    assert json.loads(h.presence.awareness.get(1).state)["a"] == 1


def test_same_user_takes_over_its_client_id_from_an_old_tab():
    h = Harness()
    old, new = h.join(FakeMember("alice")), h.join(FakeMember("alice"))
    h.presence.on_message(old, (entry(1, 1, {}),))
    h.presence.on_message(new, (entry(1, 2, {"v": 2}),))
    assert h.rejected == 0 and h.presence.awareness.owner_of(1) is new
    h.leave(old)  # the old tab's close must not remove the state the new tab now owns
    assert 1 in h.presence.awareness


def test_too_many_client_ids_closes_the_connection():
    h = Harness()
    alice = h.join(FakeMember("alice"))
    with pytest.raises(ProtocolError):
        h.presence.on_message(alice, tuple(entry(i, 1, {}) for i in range(1, 20)))


async def test_leave_removes_the_members_states_everywhere_at_once():
    h = Harness(flush_ms=1000)
    alice, bob = h.join(FakeMember("alice")), h.join(FakeMember("bob"))
    h.presence.on_message(alice, (entry(1, 1, {}),))
    h.leave(alice)
    assert [(e.client_id, e.state) for e in bob.received()] == [(1, "null")]  # no wait for the window
    rows = unpack_awareness(h.published[-1])
    assert rows[0][0].state == "null" and rows[0][1] == "alice" and rows[0][2] == alice.id


async def test_changes_within_the_window_are_coalesced_into_one_frame_per_member():
    h = Harness(flush_ms=20)
    members = [h.join(FakeMember(f"u{i}")) for i in range(5)]
    for m in members:
        m.frames.clear()
    for clock in range(1, 4):
        for i, m in enumerate(members):
            h.presence.on_message(m, (entry(100 + i, clock, {"cursor": clock}),))
    assert all(not m.frames for m in members)
    await wait_until(lambda: all(m.frames for m in members), timeout=5, what="the window's flush")
    for m in members:
        assert len(m.frames) == 1  # one frame, the latest of every client (its own ignored by Yjs)
        got = {e.client_id: e.clock for e in m.received()}
        assert got == {100 + i: 3 for i in range(5)}
    assert len(h.published) == 1 and len(unpack_awareness(h.published[0])) == 5


async def test_a_batch_from_one_member_is_not_sent_back_to_it():
    h = Harness(flush_ms=10)
    alice, bob = h.join(FakeMember("alice")), h.join(FakeMember("bob"))
    h.presence.on_message(alice, (entry(1, 1, {"c": 1}),))
    await wait_until(lambda: bob.frames, timeout=5, what="the flush to bob")
    assert alice.frames == [] and len(bob.frames) == 1


def test_big_batches_are_split_so_clients_can_echo_them_back():
    h = Harness(max_entries_per_frame=4)
    members = [h.join(FakeMember(f"u{i}")) for i in range(10)]
    for i, m in enumerate(members):
        h.presence.on_message(m, (entry(100 + i, 1, {}),))
    late = h.join(FakeMember("late"))
    sizes = [len(protocol.decode(f).entries) for f in late.frames]
    assert sizes == [4, 4, 2]


async def test_rate_limit_drops_intermediate_states_and_relays_the_latest_later():
    h = Harness(flush_ms=0, rate=10, burst=2)
    alice, bob = h.join(FakeMember("alice")), h.join(FakeMember("bob"))
    for clock in range(1, 8):
        h.presence.on_message(alice, (entry(1, clock, {"cursor": clock}),))
    assert [e.clock for e in bob.received()] == [1, 2]
    h.clock.now += 1.0  # the bucket refills; the deferred latest state goes out on the retry timer
    await wait_until(lambda: len(bob.received()) >= 3, timeout=5, what="the deferred latest state")
    assert [e.clock for e in bob.received()] == [1, 2, 7]


def test_sessions_track_activity_and_idle():
    h = Harness()
    alice = h.join(FakeMember("alice"))
    h.presence.on_message(alice, (entry(1, 1, {"cursor": 1}),))
    h.clock.now += 30
    h.presence.on_message(alice, (entry(1, 2, {"cursor": 1}),))  # a renewal: not activity
    assert h.presence.idle_changes(60) == []
    h.clock.now += 31
    assert [s.member for s in h.presence.idle_changes(60)] == [alice]
    woke = []
    h.presence.on_change = woke.append
    h.presence.touch_user("alice")  # an edit
    assert [s.member for s in woke] == [alice] and not h.presence.sessions[alice].idle


def test_viewers_presence_is_hidden_where_the_room_policy_says_so():
    h = Harness(hidden_viewer_rooms=("doc",))
    viewer, editor = h.join(FakeMember("v", role="viewer")), h.join(FakeMember("e"))
    h.presence.on_message(viewer, (entry(1, 1, {}),))
    assert editor.received() == [] and h.presence.sessions[viewer].hidden


def test_peer_entries_carry_their_session_and_old_four_field_rows_still_parse():
    h = Harness()
    bob = h.join(FakeMember("bob"))
    stamped = json.dumps({"user": {"id": "zed"}})
    h.presence.on_peer("n2", pack_awareness([(AwarenessEntry(7, 1, stamped), "zed", "c9")]))
    assert h.presence.awareness.get(7).session == "n2/c9"
    import msgpack
    h.presence.on_peer("n3", msgpack.packb([[8, 1, stamped, "zed"]]))
    assert 8 in h.presence.awareness
    assert {e.client_id for e in bob.received()} == {7, 8}
    h.presence.on_node_down("n2")
    assert 7 not in h.presence.awareness


def test_expired_states_are_removed_and_published():
    h = Harness()
    alice, bob = h.join(FakeMember("alice")), h.join(FakeMember("bob"))
    h.presence.on_message(alice, (entry(1, 1, {}),))
    h.clock.now += 31
    h.presence.expire(30)
    assert bob.received()[-1].state == "null"
    assert unpack_awareness(h.published[-1])[0][0].state == "null"


async def test_a_flood_of_fresh_client_ids_cannot_grow_the_deferred_states():
    h = Harness(rate=1, burst=1)
    alice = h.join(FakeMember("alice"))
    h.presence.on_message(alice, (entry(1, 1, {}),))
    for clock in range(2, 200):
        h.presence.on_message(alice, (entry(1, clock, {}), entry(1000 + clock, 1, {})))
    assert len(h.presence._deferred) == 1 and h.presence.awareness.holds(alice) == 1
