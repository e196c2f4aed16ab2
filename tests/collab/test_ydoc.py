"""``collab.ydoc.apply_update`` does what ``pycrdt.Doc.apply_update`` does, on both its paths."""

from __future__ import annotations

import pycrdt
import pytest

from collab.ydoc import apply_update


def _typing_updates(n: int = 300) -> list[bytes]:
    doc = pycrdt.Doc()
    text = doc.get("t", type=pycrdt.Text)
    meta = doc.get("m", type=pycrdt.Map)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(bytes(event.update)))
    for i in range(n):
        text.insert(len(text) // 2, "héllo"[i % 5])
        if i % 7 == 0:
            del text[0]
        if i % 11 == 0:
            meta[f"k{i}"] = {"n": i, "list": [1, 2, {"deep": True}]}
    return updates


def _state(doc: pycrdt.Doc) -> tuple[str, dict, bytes]:
    return str(doc.get("t", type=pycrdt.Text)), doc.get("m", type=pycrdt.Map).to_py(), doc.get_state()


def test_fast_path_builds_the_same_document_as_pycrdt():
    updates = _typing_updates()
    ours, theirs = pycrdt.Doc(), pycrdt.Doc()
    for update in updates:
        apply_update(ours, update)
        theirs.apply_update(update)
    assert _state(ours) == _state(theirs)
    assert ours._txn is None  # nothing left open: the next transaction starts cleanly
    with ours.transaction():
        ours.get("t", type=pycrdt.Text).insert(0, "!")
    assert str(ours.get("t", type=pycrdt.Text)).startswith("!")


def test_an_update_yrs_refuses_raises_as_pycrdt_does_and_leaves_the_doc_usable():
    updates = _typing_updates(20)
    bad = updates[5][:-3] + b"\xff\xff\xff"
    ours, theirs = pycrdt.Doc(), pycrdt.Doc()
    with pytest.raises(BaseException) as pycrdt_error:
        theirs.apply_update(bad)
    with pytest.raises(type(pycrdt_error.value)):
        apply_update(ours, bad)
    for update in updates:
        apply_update(ours, update)
        theirs.apply_update(update)
    assert _state(ours) == _state(theirs)


def test_document_observers_and_open_transactions_take_pycrdt_s_path():
    updates = _typing_updates(30)
    doc = pycrdt.Doc()
    seen: list[bytes] = []
    subscription = doc.observe(lambda event: seen.append(bytes(event.update)))
    apply_update(doc, updates[0])
    assert seen == [updates[0]]  # the observer saw it
    doc.unobserve(subscription)
    with doc.transaction():  # a burst: every update joins the open transaction
        for update in updates[1:]:
            apply_update(doc, update)
        assert doc._txn is not None
    reference = pycrdt.Doc()
    for update in updates:
        reference.apply_update(update)
    assert _state(doc) == _state(reference)


def test_a_failing_type_observer_is_raised_like_pycrdt_raises_it():
    updates = _typing_updates(3)
    doc = pycrdt.Doc()
    text = doc.get("t", type=pycrdt.Text)
    texts: list[str] = []

    def observer(event) -> None:
        texts.append(str(event.target))  # reads the doc inside the commit
        raise RuntimeError("observer bug")

    text.observe(observer)
    with pytest.raises(ExceptionGroup) as raised:
        apply_update(doc, updates[0])
    assert isinstance(raised.value.exceptions[0], RuntimeError)
    assert texts and texts[-1] == str(text)
    assert doc._exceptions == []  # cleared, as pycrdt clears them
