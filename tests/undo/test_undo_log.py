"""The replay behind per-user undo, without sockets: rows in, stacks and undo updates out."""

from __future__ import annotations

import itertools

import pycrdt
import pytest

from collab.undo import Op, UndoLog, digest
from storage import StoredUpdate


class Room:
    """A live doc plus its attributed log, as the server keeps them; users edit through their own docs."""

    def __init__(self, capture_seconds: float = 0.5, depth: int = 100) -> None:
        self.live = pycrdt.Doc()
        self.rows: list[StoredUpdate] = []
        self.markers: dict[str, Op] = {}
        self.ids = itertools.count(1)
        self.log = UndoLog(capture_seconds=capture_seconds, depth=depth)
        self.clients: dict[str, pycrdt.Doc] = {}

    def client(self, user: str) -> pycrdt.Doc:
        if user not in self.clients:
            doc = pycrdt.Doc()
            doc.apply_update(self.live.get_update())
            self.clients[user] = doc
        return self.clients[user]

    def append(self, update: bytes, author: str | None, ts: float) -> None:
        row = StoredUpdate(next(self.ids), "r", update, author, ts)
        self.rows.append(row)
        self.live.apply_update(update)
        self.log.apply(row, self.markers.get(digest(update)))

    def edit(self, user: str, ts: float, fn) -> None:
        doc = self.client(user)
        doc.apply_update(self.live.get_update(doc.get_state()))
        captured: list[bytes] = []
        sub = doc.observe(lambda e: captured.append(bytes(e.update)))
        try:
            fn(doc)
        finally:
            doc.unobserve(sub)
        for update in captured:
            self.append(update, user, ts)

    def type(self, user: str, ts: float, index: int, text: str, name: str = "text") -> None:
        self.edit(user, ts, lambda d: d.get(name, type=pycrdt.Text).insert(index, text))

    def delete(self, user: str, ts: float, index: int, length: int) -> None:
        self.edit(user, ts, lambda d: d.get("text", type=pycrdt.Text).__delitem__(slice(index, index + length)))

    def do(self, user: str, kind: str, ts: float) -> bool:
        prepared = self.log.prepare(user, kind, now=ts)
        if prepared is None:
            return False
        self.markers[prepared.digest] = prepared.op
        self.append(prepared.update, user, ts)
        return True

    def text(self, name: str = "text") -> str:
        return str(self.live.get(name, type=pycrdt.Text))

    def rebuilt(self) -> UndoLog:
        """A fresh replay of the same log, as another node or a restarted server builds it."""
        fresh = UndoLog(capture_seconds=self.log.capture_seconds, depth=self.log.depth)
        for row in self.rows:
            fresh.apply(row, self.markers.get(digest(row.data)))
        return fresh


def test_undo_reverts_only_the_users_group_and_redo_restores_it():
    r = Room()
    r.type("alice", 0.0, 0, "A1 ")
    r.type("bob", 0.1, 3, "B1 ")
    r.type("alice", 0.2, 6, "A2 ")
    r.type("bob", 0.3, 0, "B0 ")
    assert r.text() == "B0 A1 B1 A2 "
    assert r.log.state("alice") == (True, False)
    assert r.do("alice", "undo", 1.0)
    assert r.text() == "B0 B1 "
    assert r.log.state("alice") == (False, True)
    assert r.log.state("bob") == (True, False)
    assert r.do("alice", "redo", 1.1)
    assert r.text() == "B0 A1 B1 A2 "
    assert r.log.state("alice") == (True, False)


def test_edits_further_apart_than_the_capture_window_are_separate_groups():
    r = Room(capture_seconds=0.5)
    r.type("alice", 0.0, 0, "one ")
    r.type("alice", 0.3, 4, "two ")  # joins the first group
    r.type("alice", 1.0, 8, "three")
    assert r.do("alice", "undo", 2.0)
    assert r.text() == "one two "
    assert r.do("alice", "undo", 2.1)
    assert r.text() == ""
    assert not r.do("alice", "undo", 2.2)


def test_undo_restores_what_the_user_deleted_from_someone_elses_text():
    r = Room()
    r.type("bob", 0.0, 0, "hello world")
    r.delete("alice", 5.0, 5, 6)
    assert r.text() == "hello"
    r.type("bob", 6.0, 0, ">> ")
    assert r.do("alice", "undo", 7.0)
    assert r.text() == ">> hello world"
    assert r.do("alice", "redo", 8.0)
    assert r.text() == ">> hello"


def test_a_new_edit_clears_the_redo_stack():
    r = Room()
    r.type("alice", 0.0, 0, "abc")
    assert r.do("alice", "undo", 1.0)
    assert r.log.state("alice") == (False, True)
    r.type("alice", 2.0, 0, "x")
    assert r.log.state("alice") == (True, False)
    assert not r.do("alice", "redo", 3.0)


def test_depth_bounds_the_groups_kept_per_user():
    r = Room(depth=3)
    for i in range(5):
        r.type("alice", float(i), 0, str(i))
    assert len(r.log.users["alice"].undo) == 3
    for _ in range(3):
        assert r.do("alice", "undo", 10.0)
    assert r.text() == "10"
    assert not r.do("alice", "undo", 11.0)


def test_a_rebuilt_replay_has_the_same_stacks_and_can_continue():
    r = Room()
    r.type("alice", 0.0, 0, "first ")
    r.type("alice", 5.0, 6, "second ")
    r.type("bob", 6.0, 0, "bob ")
    assert r.do("alice", "undo", 7.0)
    assert r.text() == "bob first "
    fresh = r.rebuilt()
    assert fresh.state("alice") == (True, True)
    assert [len(fresh.users["alice"].undo), len(fresh.users["alice"].redo)] == [1, 1]
    r.log = fresh  # another node (or a restarted server) serves the next request
    assert r.do("alice", "undo", 8.0)
    assert r.text() == "bob "
    assert r.do("alice", "redo", 9.0)
    assert r.do("alice", "redo", 9.5)
    assert r.text() == "bob first second "


def test_groups_others_removed_entirely_are_skipped():
    r = Room()
    r.type("alice", 0.0, 0, "aaa")
    r.type("alice", 5.0, 3, "bbb")
    r.delete("bob", 6.0, 3, 3)  # bob deletes alice's newest group
    assert r.do("alice", "undo", 7.0)
    assert r.text() == ""
    assert r.log.state("alice") == (False, True)


def test_changes_in_any_root_type_are_undone_including_roots_created_by_the_change():
    r = Room()
    r.edit("alice", 0.0, lambda d: d.get("map", type=pycrdt.Map).__setitem__("k", "v"))
    r.edit("alice", 5.0, lambda d: d.get("prosemirror", type=pycrdt.XmlFragment).children.append(
        pycrdt.XmlElement("p", {}, [pycrdt.XmlText("hi")])))
    r.edit("bob", 6.0, lambda d: d.get("map", type=pycrdt.Map).__setitem__("b", "bob"))
    assert r.do("alice", "undo", 7.0)
    assert str(r.live.get("prosemirror", type=pycrdt.XmlFragment)) == ""
    assert r.do("alice", "undo", 8.0)
    assert r.live.get("map", type=pycrdt.Map).to_py() == {"b": "bob"}


def test_a_live_doc_that_garbage_collected_deleted_text_still_gets_it_back():
    r = Room()
    r.type("bob", 0.0, 0, "keep this text")
    r.delete("alice", 5.0, 4, 10)
    # The live room doc reloads from a compacted snapshot: deleted content is gone from it.
    gc_doc = pycrdt.Doc()
    gc_doc.apply_update(r.live.get_update())
    r.live = pycrdt.Doc()
    r.live.apply_update(gc_doc.get_update())
    assert r.do("alice", "undo", 6.0)
    assert r.text() == "keep this text"


def test_history_pruned_by_retention_is_filled_in_unattributed():
    r = Room()
    r.type("bob", 0.0, 0, "old text")
    r.type("alice", 5.0, 8, " newer")
    pruned = r.rows[0]
    snapshot = r.live.get_update()
    fresh = UndoLog()
    for row in r.rows[1:]:
        fresh.apply(row)
    missing = fresh.lacks(snapshot)
    assert missing is not None
    fresh.fill_base(missing)
    assert str(fresh.doc.get("text", type=pycrdt.Text)) == "old text newer"
    assert fresh.lacks(snapshot) is None
    assert pruned.author == "bob"
    r.log = fresh
    r.type("alice", 10.0, 0, "x")  # edits after the rebuild are undoable as usual
    assert r.do("alice", "undo", 11.0)
    assert r.text() == "old text newer"


@pytest.mark.parametrize("kind", ["undo", "redo"])
def test_nothing_to_do_returns_none(kind):
    assert UndoLog().prepare("nobody", kind) is None


@pytest.mark.parametrize("seed", range(40))
def test_random_sessions_rebuild_to_the_same_stacks_and_undo_redo_round_trips(seed):
    import random

    rng = random.Random(seed)
    r = Room(capture_seconds=0.5, depth=8)
    users = ["alice", "bob", "carol"]
    voided: set[str] = set()  # stacks emptied because every group left was void: only this node knows
    now = 0.0
    for _ in range(60):
        now += rng.choice([0.1, 0.2, 1.0])
        user = rng.choice(users)
        length = len(r.text())
        roll = rng.random()
        if roll < 0.45 or length == 0:
            r.type(user, now, rng.randint(0, length), rng.choice(["x", "yy", "zzz "]) + user[0])
        elif roll < 0.6:
            start = rng.randrange(length)
            r.delete(user, now, start, rng.randint(1, min(4, length - start)))
        else:
            kind = rng.choice(["undo", "redo"])
            before = r.text()
            could = r.log.state(user)[0 if kind == "undo" else 1]
            done = r.do(user, kind, now)
            if could and not done:
                voided.add(user)
            if done and rng.random() < 0.5:
                # Nobody edited in between: the opposite operation restores the text exactly.
                assert r.do(user, "redo" if kind == "undo" else "undo", now + 0.01)
                assert r.text() == before
        fresh = r.rebuilt()
        for name in set(users) - voided:
            mine, theirs = r.log.users.get(name), fresh.users.get(name)
            assert (mine and (len(mine.undo), len(mine.redo))) == (theirs and (len(theirs.undo), len(theirs.redo)))
        assert str(fresh.doc.get("text", type=pycrdt.Text)) == r.text()
        if rng.random() < 0.2:
            r.log = fresh  # the next requests are served by another node / after a restart
            voided.clear()
