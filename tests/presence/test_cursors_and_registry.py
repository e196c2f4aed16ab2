"""Cursor resolution against a pycrdt Doc, stamping colours, and the workspace registry's events."""

from __future__ import annotations

import pycrdt

from presence.cursors import Resolver
from presence.registry import Registry, SessionRecord
from presence.stamp import color_for, css_color


def yjs_position(doc: pycrdt.Doc, text: pycrdt.Text, index: int) -> dict:
    """What JSON.stringify(Y.createRelativePositionFromTypeIndex(ytext, index)) produces."""
    item = pycrdt.StickyIndex.new(text, index, pycrdt.Assoc.AFTER).to_json().get("item")
    return {"type": None, "tname": "text", "item": item, "assoc": 0}


def test_cursor_follows_concurrent_edits():
    doc = pycrdt.Doc()
    text = doc.get("text", type=pycrdt.Text)
    text.insert(0, "hello world")
    state = {"cursor": {"anchor": yjs_position(doc, text, 6), "head": yjs_position(doc, text, 8)}}
    assert Resolver.of(doc).cursor(state) == {"anchor": 6, "head": 8, "from": 6, "to": 8, "type": "text"}
    text.insert(0, ">> ")
    del text[10:12]  # delete "or": the head sticks to what follows
    assert Resolver.of(doc).cursor(state)["anchor"] == 9
    assert Resolver.of(doc).cursor(state)["head"] == 10


def test_end_of_text_and_hostile_positions_resolve_or_are_null():
    doc = pycrdt.Doc()
    text = doc.get("text", type=pycrdt.Text)
    text.insert(0, "abc")
    r = Resolver.of(doc)
    assert r.position({"type": None, "tname": "text", "item": None, "assoc": 0}) == (3, "text")  # end
    for bad in ({"tname": "nope", "assoc": 0}, {"item": {"client": 1, "clock": 99}, "assoc": 0},
                {"item": {"client": -1, "clock": 0}}, {"garbage": 1}, {"type": {"client": 5, "clock": 3}},
                {"item": {"client": 2**60, "clock": 2**70}}, "x", None, {"item": {"client": 1.5, "clock": 0}}):
        assert r.position(bad)[0] is None, bad
    assert r.cursor({"cursor": "nope"}) is None and r.cursor({}) is None


def test_colours_are_stable_hex_and_client_colours_are_validated():
    assert color_for("alice") == color_for("alice") != color_for("bob")
    assert css_color(color_for("alice")) == color_for("alice")
    assert css_color("#ABC") == "#aabbcc" and css_color("red") is None and css_color("#12345") is None


def rec(sid: str, room: str, user: str, idle: bool = False, node: str = "n1") -> SessionRecord:
    return SessionRecord(f"{node}/{sid}", node, room, user, user.title(), "editor", "#000000", 1.0, 2.0, idle)


def kinds(events):
    return [(e.kind, e.room, e.user.user) for e in events]


def test_a_user_joins_once_and_leaves_with_their_last_session():
    reg = Registry()
    assert kinds(reg.upsert([rec("c1", "a", "ann")])) == [("join", "a", "ann")]
    assert kinds(reg.upsert([rec("c2", "a", "ann", node="n2")])) == []
    assert kinds(reg.remove(["n1/c1"])) == []
    assert kinds(reg.upsert([rec("c2", "a", "ann", idle=True, node="n2")])) == [("idle", "a", "ann")]
    assert kinds(reg.upsert([rec("c2", "a", "ann", idle=False, node="n2")])) == [("active", "a", "ann")]
    assert kinds(reg.drop_node("n2")) == [("leave", "a", "ann")]
    assert len(reg) == 0


def test_a_nodes_snapshot_replaces_what_we_held_for_it():
    reg = Registry()
    reg.upsert([rec("c1", "a", "ann", node="n2"), rec("c2", "b", "bob", node="n2")])
    events = reg.replace_node("n2", [rec("c2", "b", "bob", node="n2"), rec("c3", "c", "cid", node="n2")])
    assert sorted(kinds(events)) == [("join", "c", "cid"), ("leave", "a", "ann")]
    assert sorted(reg.rooms("")) == ["b", "c"] and list(reg.rooms("c")) == ["c"]
