"""Tests for collab.updates, the validator of untrusted Yjs update bytes.

Real data only: updates produced by pycrdt and by Yjs 13.6 in Node, a real editing trace, and
hand-made hostile frames built with the small lib0 encoder below. The reason the validator exists
is shown in a subprocess: pycrdt dies (SIGSEGV) on deep nesting that the validator rejects.
"""

from __future__ import annotations

import gzip
import json
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pycrdt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collab.updates import InvalidUpdate, json_depth, validate_state_vector, validate_update
from lib0frames import child_item, nested_any_arrays, nested_maps_update, root_item, update, vs, vu

TRACE = Path("/work/shared/traces/automerge-paper.json.gz")
NODE = shutil.which("node") or "/usr/bin/node"
TRACE_TXNS = 20_000


def assert_invalid(data: bytes, reason: str | None = None, **kwargs: int) -> InvalidUpdate:
    with pytest.raises(InvalidUpdate) as info:
        validate_update(data, **kwargs)
    if reason is not None:
        assert reason in str(info.value)
    return info.value


def validates_or_rejects(data: bytes) -> bool:
    """True if valid, False if InvalidUpdate; any other exception propagates (a test failure)."""
    try:
        validate_update(data)
    except InvalidUpdate as exc:
        message = str(exc)
        assert message and message.isprintable() and len(message) < 80
        return False
    return True


# --------------------------------------------------------------------------------------------
# Real updates from pycrdt


class Recorder:
    """A pycrdt Doc whose every transaction's update is kept."""

    def __init__(self) -> None:
        self.doc = pycrdt.Doc()
        self.updates: list[bytes] = []
        self._sub = self.doc.observe(lambda event: self.updates.append(event.update))


def text_offsets(text: pycrdt.Text) -> list[int]:
    """The offsets between characters/embeds, in pycrdt's units (UTF-8 bytes; an embed is 1)."""
    offsets = [0]
    for chunk, _ in text.diff():
        if isinstance(chunk, str):
            for char in chunk:
                offsets.append(offsets[-1] + len(char.encode()))
        else:
            offsets.append(offsets[-1] + 1)
    return offsets


def pycrdt_rich_updates() -> list[bytes]:
    """Incremental, full and diff updates of a document using every kind of content."""
    rec = Recorder()
    doc = rec.doc
    text = doc.get("text", type=pycrdt.Text)
    meta = doc.get("meta", type=pycrdt.Map)
    items = doc.get("items", type=pycrdt.Array)
    xml = doc.get("xml", type=pycrdt.XmlFragment)

    text.insert(0, "Hello world, héllo wörld 😀 𝄞")
    text.format(0, 5, {"bold": True})
    text.format(6, 11, {"link": {"href": "https://example.com", "rel": ["a", {"b": None}]}})
    text.insert_embed(3, {"image": "https://example.com/a.png", "size": [640, 480]})
    text.insert(1, "Δ", {"italic": True, "color": "#f00"})
    state_before = doc.get_state()
    with doc.transaction():
        meta["title"] = "A document"
        meta["count"] = 42
        meta["ratio"] = 0.125
        meta["big"] = 2**60
        meta["flag"] = False
        meta["nothing"] = None
        meta["blob"] = b"\x00\x01\xff binary"
        meta["json"] = {"a": [1, 2, {"b": [True, None, "x"]}], "c": {}}
    meta["nested"] = pycrdt.Map({"inner": pycrdt.Array([1, "two", pycrdt.Text("three")])})
    meta["sub"] = pycrdt.Doc()
    items.extend(list(range(50)))
    items.insert(10, pycrdt.Map({"k": pycrdt.Map({"k": pycrdt.Array([b"bytes"])})}))
    xml.children.append(
        pycrdt.XmlElement("p", {"class": "lead", "data-x": "1"}, [pycrdt.XmlText("para")])
    )
    xml.children.append(pycrdt.XmlElement("ul", None, [pycrdt.XmlElement("li", {"a": "b"})]))
    xml_text = pycrdt.XmlText("formatted")
    xml.children.append(xml_text)
    xml_text.format(0, 4, {"b": True})
    xml.children[0].attributes["style"] = "bold"
    # delete-only transactions (pycrdt's Text offsets are UTF-8 bytes: cut on characters)
    offsets = text_offsets(text)
    del text[offsets[2] : offsets[9]]
    del items[0:20]
    del meta["title"]
    del xml.children[1]
    full = doc.get_update()
    diff = doc.get_update(state_before)
    return [*rec.updates, full, diff, pycrdt.merge_updates(*rec.updates)]


PYCRDT_UPDATES = pycrdt_rich_updates()


def test_pycrdt_updates_are_valid() -> None:
    assert len(PYCRDT_UPDATES) > 20
    for data in PYCRDT_UPDATES:
        validate_update(data)


def test_delete_only_update_is_valid() -> None:
    rec = Recorder()
    text = rec.doc.get("t", type=pycrdt.Text)
    text.insert(0, "abcdef")
    del text[1:4]
    delete_only = rec.updates[-1]
    assert delete_only[:2] == b"\x00\x01"  # no structs, one client in the delete set
    validate_update(delete_only)


def test_empty_update_and_state_vector() -> None:
    validate_update(b"\x00\x00")
    validate_update(pycrdt.Doc().get_update())
    validate_state_vector(b"\x00")
    validate_state_vector(pycrdt.Doc().get_state())


def test_wire_reference_example() -> None:
    """The update inside the y-websocket frame `00 02 0e ...` (insert "hi", client 1234567)."""
    validate_update(bytes.fromhex("010187ad4b0004010174026869 00".replace(" ", "")))


def test_bytes_like_input() -> None:
    data = PYCRDT_UPDATES[0]
    validate_update(bytearray(data))
    validate_update(memoryview(data))


def test_state_vectors() -> None:
    rec = Recorder()
    rec.doc.get("t", type=pycrdt.Text).insert(0, "x" * 1000)
    validate_state_vector(rec.doc.get_state())
    validate_state_vector(vu(2) + vu(1) + vu(0) + vu(2**53 - 1) + vu(2**32 - 1))
    sv = rec.doc.get_state()
    for cut in range(len(sv)):
        with pytest.raises(InvalidUpdate):
            validate_state_vector(sv[:cut])
    bad = [
        sv + b"\x00",  # trailing
        vu(2**40) + b"\x01\x01",  # count larger than the frame
        vu(1) + vu(1) + vu(2**32),  # clock out of yrs' range
        vu(1) + b"\xff" * 9 + b"\x01" + vu(0),  # 10-byte varint
    ]
    for data in bad:
        with pytest.raises(InvalidUpdate):
            validate_state_vector(data)


def test_nested_types_from_pycrdt_depth() -> None:
    def chain(depth: int) -> bytes:
        value: pycrdt.Map = pycrdt.Map({"leaf": 1})
        for _ in range(depth - 1):
            value = pycrdt.Map({"k": value})
        doc = pycrdt.Doc()
        doc.get("root", type=pycrdt.Map)["k"] = value
        return doc.get_update()

    validate_update(chain(64))
    assert_invalid(chain(65), "nesting too deep")
    validate_update(chain(10), max_depth=10)
    assert_invalid(chain(10), "nesting too deep", max_depth=9)


# --------------------------------------------------------------------------------------------
# Random edit sequences in pycrdt


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
attr_values = (
    st.none()
    | st.booleans()
    | st.text(max_size=8)
    | st.dictionaries(st.text(max_size=4), st.integers(0, 9), max_size=2)
)
format_attrs = st.dictionaries(
    st.sampled_from(["bold", "italic", "link", "color"]), attr_values, min_size=1, max_size=2
)
attrs = st.none() | format_attrs
fraction = st.floats(0, 1)
operations = st.one_of(
    st.tuples(st.just("text_insert"), fraction, st.text(min_size=1, max_size=12), attrs),
    st.tuples(st.just("text_delete"), fraction, st.integers(1, 6)),
    st.tuples(st.just("text_format"), fraction, st.integers(1, 6), format_attrs),
    st.tuples(st.just("text_embed"), fraction, st.dictionaries(st.text(max_size=5), json_values, max_size=3)),
    st.tuples(st.just("map_set"), st.sampled_from("abcde"), json_values),
    st.tuples(st.just("map_nest"), st.sampled_from("abcde"), st.integers(1, 4)),
    st.tuples(st.just("map_delete"), st.sampled_from("abcde")),
    st.tuples(st.just("array_insert"), fraction, json_values),
    st.tuples(st.just("array_delete"), fraction, st.integers(1, 3)),
    st.tuples(st.just("xml_insert"), st.sampled_from(["p", "h1", "li"]), st.text(max_size=10), st.dictionaries(st.sampled_from(["class", "id"]), st.text(max_size=5), max_size=2)),
    st.tuples(st.just("xml_delete"), fraction),
)


def apply_operation(doc: pycrdt.Doc, op: tuple) -> None:
    text = doc.get("text", type=pycrdt.Text)
    meta = doc.get("meta", type=pycrdt.Map)
    items = doc.get("items", type=pycrdt.Array)
    xml = doc.get("xml", type=pycrdt.XmlFragment)
    kind = op[0]
    if kind.startswith("text_"):
        offsets = text_offsets(text)
        at = int(op[1] * (len(offsets) - 1))
        if kind == "text_insert":
            text.insert(offsets[at], op[2], op[3])
        elif kind == "text_embed":
            text.insert_embed(offsets[at], op[2])
        elif len(offsets) > 1:
            at = min(at, len(offsets) - 2)
            stop = offsets[min(at + op[2], len(offsets) - 1)]
            if kind == "text_delete":
                del text[offsets[at] : stop]
            else:
                text.format(offsets[at], stop, op[3])
    elif kind == "map_set":
        meta[op[1]] = op[2]
    elif kind == "map_nest":
        value: pycrdt.Map | pycrdt.Array = pycrdt.Array(["leaf", pycrdt.Text("t")])
        for _ in range(op[2]):
            value = pycrdt.Map({"k": value, "n": 1})
        meta[op[1]] = value
    elif kind == "map_delete" and op[1] in meta:
        del meta[op[1]]
    elif kind == "array_insert":
        items.insert(int(op[1] * len(items)), op[2])
    elif kind == "array_delete" and len(items):
        start = int(op[1] * (len(items) - 1))
        del items[start : min(len(items), start + op[2])]
    elif kind == "xml_insert":
        xml.children.append(pycrdt.XmlElement(op[1], op[3], [pycrdt.XmlText(op[2])]))
    elif kind == "xml_delete" and len(xml.children):
        del xml.children[int(op[1] * (len(xml.children) - 1))]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(operations, min_size=1, max_size=4), min_size=1, max_size=12))
def test_random_pycrdt_edits_validate(transactions: list[list[tuple]]) -> None:
    rec = Recorder()
    peer = Recorder()
    states = []
    for ops in transactions:
        states.append(rec.doc.get_state())
        with rec.doc.transaction():
            for op in ops:
                apply_operation(rec.doc, op)
        # a second client edits concurrently, so updates hold several clients
        peer.doc.apply_update(rec.doc.get_update(peer.doc.get_state()))
        with peer.doc.transaction():
            apply_operation(peer.doc, ops[0])
        rec.doc.apply_update(peer.doc.get_update(rec.doc.get_state()))
    for data in [*rec.updates, *peer.updates]:
        validate_update(data)
    validate_update(rec.doc.get_update())
    for state in states:
        validate_update(rec.doc.get_update(state))
    validate_state_vector(rec.doc.get_state())


# --------------------------------------------------------------------------------------------
# Real updates from Yjs 13.6 in Node

NODE_SCRIPT = r"""
const Y = require('yjs')
const out = {}
const hex = (u) => Buffer.from(u).toString('hex')
const add = (name, u) => { out[name] = hex(u) }
const capture = (doc, prefix) => {
  let i = 0
  doc.on('update', (u) => { add(`${prefix}/incremental-${i++}`, u) })
}
{ // rich text: formatting, embeds, emoji, deletes
  const doc = new Y.Doc(); doc.clientID = 1; capture(doc, 'text')
  const t = doc.getText('t')
  t.insert(0, 'hello world')
  t.insert(5, ' 😀 émoji 𝄞', { bold: true })
  t.format(0, 3, { italic: true, link: { href: 'https://example.com', nested: [1, { a: null }] } })
  t.insertEmbed(2, { image: 'https://x/y.png', size: [10, 20] })
  t.delete(1, 4)
  t.applyDelta([{ retain: 3 }, { insert: 'Δ', attributes: { color: '#f00' } }, { delete: 1 }])
  add('text/full', Y.encodeStateAsUpdate(doc))
}
{ // maps, arrays, every kind of Any value
  const doc = new Y.Doc(); doc.clientID = 123456789; capture(doc, 'any')
  const m = doc.getMap('m')
  const a = doc.getArray('a')
  doc.transact(() => {
    m.set('int', 42); m.set('neg', -123456789012); m.set('float', 3.25); m.set('big', 2n ** 60n)
    m.set('str', 'x'.repeat(300)); m.set('bool', true); m.set('f', false); m.set('null', null)
    m.set('undef', undefined); m.set('bin', new Uint8Array([0, 1, 255, 128]))
    m.set('obj', { deep: { deeper: [1, 2, { deepest: 'yes' }] }, list: [], e: {} })
  })
  const inner = new Y.Map(); m.set('inner', inner)
  const arr = new Y.Array(); inner.set('arr', arr)
  arr.push([1, 'two', { three: 3 }, new Uint8Array([9])])
  const deeper = new Y.Map(); arr.insert(1, [deeper]); deeper.set('k', 'v')
  a.push(Array.from({ length: 200 }, (_, i) => i * 1.5))
  a.delete(10, 50)
  m.delete('str')
  add('any/full', Y.encodeStateAsUpdate(doc))
}
{ // XML: elements, attributes, formatted text, hooks
  const doc = new Y.Doc(); doc.clientID = 7; capture(doc, 'xml')
  const frag = doc.getXmlFragment('prosemirror')
  const p = new Y.XmlElement('paragraph'); frag.insert(0, [p])
  p.setAttribute('align', 'center'); p.setAttribute('data', 'x')
  const txt = new Y.XmlText(); p.insert(0, [txt])
  txt.insert(0, 'Some text', { strong: {} }); txt.format(0, 4, { em: true })
  const hook = new Y.XmlHook('custom-hook'); frag.insert(1, [hook]); hook.set('k', 'v')
  const h2 = new Y.XmlElement('heading'); frag.insert(0, [h2]); h2.insert(0, [new Y.XmlText('Title')])
  frag.delete(2, 1)
  add('xml/full', Y.encodeStateAsUpdate(doc))
}
{ // subdocuments
  const doc = new Y.Doc(); doc.clientID = 99; capture(doc, 'subdoc')
  const sub = new Y.Doc({ meta: { title: 'child' }, autoLoad: true, shouldLoad: true })
  doc.getMap('docs').set('child', sub)
  doc.getArray('list').push([new Y.Doc()])
  add('subdoc/full', Y.encodeStateAsUpdate(doc))
}
{ // two clients, merges, diffs, Skip structs (merging non-contiguous updates)
  const a = new Y.Doc(); a.clientID = 1000
  const b = new Y.Doc(); b.clientID = 4294967295
  const ups = []
  a.on('update', u => ups.push(u)); b.on('update', u => ups.push(u))
  a.getText('t').insert(0, 'abc'); b.getText('t').insert(0, 'xyz')
  Y.applyUpdate(a, Y.encodeStateAsUpdate(b)); Y.applyUpdate(b, Y.encodeStateAsUpdate(a))
  a.getText('t').insert(2, 'AAA'); b.getText('t').delete(0, 2)
  a.getText('t').insert(1, 'BBB')
  Y.applyUpdate(a, Y.encodeStateAsUpdate(b, Y.encodeStateVector(a)))
  ups.forEach((u, i) => add(`multi/update-${i}`, u))
  add('multi/merged', Y.mergeUpdates(ups))
  add('multi/merged-gaps', Y.mergeUpdates([ups[0], ups[ups.length - 1]]))
  add('multi/diff', Y.diffUpdate(Y.mergeUpdates(ups), Y.encodeStateVector(b)))
  add('multi/full-a', Y.encodeStateAsUpdate(a))
  out['sv/a'] = hex(Y.encodeStateVector(a))
  out['sv/empty'] = hex(Y.encodeStateVector(new Y.Doc()))
}
{ // undo/redo with gc off (deleted content kept)
  const doc = new Y.Doc({ gc: false }); doc.clientID = 31337; capture(doc, 'undo')
  const t = doc.getText('t'); const um = new Y.UndoManager(t, { captureTimeout: 0 })
  t.insert(0, 'one '); t.insert(4, 'two '); um.undo(); um.redo(); um.undo()
  doc.getMap('m').set('x', 1); doc.getMap('m').delete('x')
  add('undo/full', Y.encodeStateAsUpdate(doc))
}
{ // 4 levels of types; levels 2 and 4 take their parent from their origin, level 2's origin
  // is the last UTF-16 unit of an emoji string
  const doc = new Y.Doc(); doc.clientID = 5
  const root = doc.getMap('root')
  const txt = new Y.Text(); root.set('text', txt)
  txt.insert(0, '😀a𝄞')
  const emb = new Y.Map(); txt.insertEmbed(5, emb)
  const lst = new Y.Array(); emb.set('list', lst)
  lst.push(['x']); const leaf = new Y.Map(); lst.push([leaf])
  leaf.set('k', 'v')
  add('nest4/full', Y.encodeStateAsUpdate(doc))
}
{ // a Skip struct: merging the 1st and 3rd update of one client leaves a gap
  const doc = new Y.Doc(); doc.clientID = 77; const us = []; doc.on('update', u => us.push(u))
  const t = doc.getText('t'); t.insert(0, 'aaa'); t.insert(3, 'bbb'); t.insert(6, 'ccc')
  add('skip/merged', Y.mergeUpdates([us[0], us[2]]))
}
add('empty/full', Y.encodeStateAsUpdate(new Y.Doc()))
process.stdout.write(JSON.stringify(out))
"""


@pytest.fixture(scope="session")
def yjs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temp dir with yjs@13.6 installed from the npm registry."""
    root = tmp_path_factory.mktemp("yjs")
    proc = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(root), "yjs@13.6"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"npm install yjs failed:\n{proc.stdout}\n{proc.stderr}"
    return root


@pytest.fixture(scope="session")
def yjs_updates(yjs_dir: Path) -> dict[str, bytes]:
    script = yjs_dir / "gen.cjs"
    script.write_text(NODE_SCRIPT)
    proc = subprocess.run(
        [NODE, str(script)], cwd=yjs_dir, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return {name: bytes.fromhex(value) for name, value in json.loads(proc.stdout).items()}


def test_yjs_updates_are_valid(yjs_updates: dict[str, bytes]) -> None:
    updates = {k: v for k, v in yjs_updates.items() if not k.startswith("sv/")}
    assert len(updates) > 40
    for name, data in updates.items():
        try:
            validate_update(data)
        except InvalidUpdate as exc:  # pragma: no cover - failure report
            pytest.fail(f"{name}: {exc}")
    for name in ("sv/a", "sv/empty"):
        validate_state_vector(yjs_updates[name])


def test_yjs_skip_structs_are_valid(yjs_updates: dict[str, bytes]) -> None:
    merged = yjs_updates["skip/merged"]
    # client 77, clock 0: "aaa", a Skip (ref 10) of the 3 missing clocks, "ccc"
    assert merged.startswith(b"\x01\x03\x4d\x00\x04")
    assert b"\x0a\x03" in merged
    validate_update(merged)


def test_depth_follows_origins_and_utf16_clocks(yjs_updates: dict[str, bytes]) -> None:
    """Levels 2 and 4 get their parent through their origin item (level 2's origin is inside an
    emoji string whose clock length counts UTF-16 units): a validator that ignored origins, or
    counted code points, would see at most 3 levels."""
    data = yjs_updates["nest4/full"]
    validate_update(data, max_depth=4)
    assert_invalid(data, "nesting too deep", max_depth=3)
    assert_invalid(data, "nesting too deep", max_depth=1)


# --------------------------------------------------------------------------------------------
# A real editing trace


@pytest.fixture(scope="session")
def trace_updates() -> tuple[list[bytes], bytes, str]:
    """Replay the first TRACE_TXNS transactions of automerge-paper into a pycrdt Text."""
    trace = json.loads(gzip.decompress(TRACE.read_bytes()))
    rec = Recorder()
    text = rec.doc.get("text", type=pycrdt.Text)
    expected: list[str] = []
    for txn in trace["txns"][:TRACE_TXNS]:
        with rec.doc.transaction():
            for pos, delete, insert in txn["patches"]:
                if delete:
                    del text[pos : pos + delete]
                    del expected[pos : pos + delete]
                if insert:
                    text.insert(pos, insert)
                    expected[pos:pos] = insert
    assert str(text) == "".join(expected)
    return rec.updates, rec.doc.get_update(), str(text)


def test_trace_updates_validate(trace_updates: tuple[list[bytes], bytes, str]) -> None:
    updates, final, _ = trace_updates
    assert len(updates) == TRACE_TXNS
    started = time.perf_counter()
    for data in updates:
        validate_update(data)
    per_update = (time.perf_counter() - started) / len(updates)
    started = time.perf_counter()
    validate_update(final)
    elapsed = time.perf_counter() - started
    print(
        f"\n{len(updates)} trace updates: {per_update * 1e6:.1f} us each; final update "
        f"{len(final)} bytes in {elapsed * 1e3:.1f} ms ({len(final) / elapsed / 2**20:.1f} MiB/s)"
    )
    assert per_update < 100e-6  # generous: ~4 us on a laptop-class core


# --------------------------------------------------------------------------------------------
# Malformed and hostile input


def real_samples(yjs: dict[str, bytes]) -> list[bytes]:
    small = [u for u in PYCRDT_UPDATES if len(u) < 3000]
    return small + [v for k, v in yjs.items() if not k.startswith("sv/")]


def test_every_truncation_is_rejected_cleanly(yjs_updates: dict[str, bytes]) -> None:
    checked = 0
    for data in real_samples(yjs_updates):
        for cut in range(len(data)):
            validates_or_rejects(data[:cut])
            checked += 1
        # dropping the last byte of a real update always breaks it
        assert_invalid(data[:-1])
    assert checked > 1000


def test_truncations_of_a_large_update(trace_updates: tuple[list[bytes], bytes, str]) -> None:
    final = trace_updates[1]
    for cut in [*range(0, 200), *range(200, len(final), 997), len(final) - 1]:
        assert not validates_or_rejects(final[:cut])


def test_trailing_bytes_rejected() -> None:
    for data in PYCRDT_UPDATES[:10]:
        assert_invalid(data + b"\x00", "trailing")
        assert_invalid(data + data)
    assert_invalid(b"\x00\x00\x00", "trailing")


def test_overlong_varints_rejected() -> None:
    nine_bytes = b"\xff" * 8 + b"\x01"
    assert_invalid(vu(1) + vu(1) + nine_bytes + vu(0) + root_item(4, vs("x")) + b"\x00", "varint")
    assert_invalid(b"\x80" * 1_000_000, "varint")  # the quadratic-decoder bait
    # eight bytes are fine up to 2**53 - 1, not beyond
    validate_update(update(2**53 - 1, 0, [root_item(4, vs("x"))]))
    assert_invalid(update(2**53, 0, [root_item(4, vs("x"))]), "out of range")


def test_huge_counts_in_tiny_frames_rejected_fast() -> None:
    frames = [
        vu(2**50) + b"\x00" * 8,  # clients
        vu(1) + vu(2**50) + vu(5) + vu(0) + b"\x00" * 8,  # structs
        update(5, 0, [root_item(8, vu(2**40) + b"\x7e")]),  # Any values
        update(5, 0, [root_item(8, vu(1) + b"\x75" + vu(2**40) + b"\x7e")]),  # Any array
        update(5, 0, [root_item(8, vu(1) + b"\x76" + vu(2**40) + b"\x7e")]),  # Any object
        update(5, 0, [root_item(2, vu(2**40) + vs("1"))]),  # JSON entries
        update(5, 0, [root_item(4, vu(2**40) + b"abc")]),  # string length
        update(5, 0, [root_item(3, vu(2**40) + b"abc")]),  # binary length
        b"\x00" + vu(2**50) + b"\x00" * 4,  # delete-set clients
        b"\x00\x01\x05" + vu(2**50) + b"\x00" * 4,  # delete-set ranges
    ]
    started = time.perf_counter()
    for data in frames:
        assert_invalid(data)
    assert time.perf_counter() - started < 0.05


def test_clock_ranges_rejected() -> None:
    text = root_item(4, vs("hi"))
    validate_update(update(5, 2**32 - 3, [text]))
    assert_invalid(update(5, 2**32 - 2, [text]), "clock")
    assert_invalid(update(5, 2**33, [text]), "clock")  # yrs would silently wrap it to 0
    assert_invalid(update(5, 0, [b"\x00" + vu(2**40)]), "clock")  # GC
    assert_invalid(update(5, 0, [root_item(1, vu(2**40))]), "clock")  # Deleted
    assert_invalid(update(5, 0, [b"\x84" + vu(5) + vu(2**33) + vs("x")]), "clock")  # origin
    assert_invalid(update(5, 0, [text], vu(1) + vu(5) + vu(1) + vu(0) + vu(2**40)), "clock")


def test_unknown_refs_and_tags_rejected() -> None:
    for ref in range(11, 32):
        assert_invalid(update(5, 0, [root_item(ref, vs("x"))]), "content ref")
    for type_ref in (7, 9, 15, 100):
        assert_invalid(update(5, 0, [root_item(7, vu(type_ref))]), "type ref")
    for tag in [*range(0, 116), 128, 255]:
        assert_invalid(update(5, 0, [root_item(8, vu(1) + bytes([tag]))]), "tag")


def test_duplicate_client_sections_rejected() -> None:
    section = vu(1) + vu(5) + vu(0) + root_item(4, vs("x"))
    assert_invalid(vu(2) + section + section + b"\x00", "twice")


def test_empty_structs_rejected() -> None:
    """Zero-length structs: never written by Yjs, and yrs panics on them (see below)."""
    text = root_item(4, vs("x"))
    cases = {
        "GC": update(5, 0, [b"\x00" + vu(0)]),
        "GC, overlong zero": update(5, 0, [b"\x00\x80\x00"]),
        "Deleted, overlong zero": update(5, 0, [root_item(1, b"\x80\x80\x00")]),
        "Skip": update(5, 0, [text, b"\x0a" + vu(0)]),
        "Deleted": update(5, 0, [root_item(1, vu(0))]),
        "String": update(5, 0, [root_item(4, vs(""))]),
        "Any": update(5, 0, [root_item(8, vu(0))]),
        "JSON": update(5, 0, [root_item(2, vu(0))]),
    }
    for data in cases.values():
        assert_invalid(data, "empty struct")
    assert_invalid(vu(1) + vu(0) + vu(5) + vu(0) + b"\x00", "empty client section")
    assert_invalid(update(5, 0, [text], vu(1) + vu(5) + vu(1) + vu(0) + vu(0)), "empty delete")


def test_invalid_utf8_rejected() -> None:
    for raw in (b"\xff", b"\xc3", b"\xed\xa0\x80", b"a\x80b", b"\xf4\x90\x80\x80"):
        assert_invalid(update(5, 0, [root_item(4, vs(raw))]), "UTF-8")  # string content
        assert_invalid(update(5, 0, [root_item(4, vs("x"), name=raw)]), "UTF-8")  # type name
        assert_invalid(update(5, 0, [root_item(8, vu(1) + b"\x77" + vs(raw))]), "UTF-8")


def test_invalid_json_rejected() -> None:
    for text in ("", "{", "[1,]", "NaN", "Infinity", "-Infinity", "undefined", "{'a': 1}", "1 2"):
        assert_invalid(update(5, 0, [root_item(5, vs(text))]), "JSON")  # embed
        assert_invalid(update(5, 0, [root_item(6, vs("bold") + vs(text))]), "JSON")  # format
    validate_update(update(5, 0, [root_item(2, vu(3) + vs("undefined") + vs("[1]") + vs('"s"'))]))
    assert_invalid(update(5, 0, [root_item(2, vu(1) + vs("{"))]), "JSON")


def test_deep_any_nesting_rejected_fast() -> None:
    validate_update(update(5, 0, [root_item(8, vu(1) + nested_any_arrays(64), key="k")]))
    assert_invalid(
        update(5, 0, [root_item(8, vu(1) + nested_any_arrays(65), key="k")]), "nesting too deep"
    )
    deep = update(5, 0, [root_item(8, vu(1) + nested_any_arrays(100_000), key="k")])
    started = time.perf_counter()
    assert_invalid(deep, "nesting too deep")
    assert time.perf_counter() - started < 0.05
    objects = b"".join(b"\x76\x01" + vs("k") for _ in range(100_000)) + b"\x7e"
    assert_invalid(update(5, 0, [root_item(8, vu(1) + objects, key="k")]), "nesting too deep")
    # inside a subdocument's options, too
    assert_invalid(update(5, 0, [root_item(9, vs("guid") + nested_any_arrays(1000))]), "deep")


def test_deep_json_rejected() -> None:
    for depth, ok in ((64, True), (65, False), (100_000, False)):
        text = "[" * depth + "]" * depth
        for content in (root_item(5, vs(text)), root_item(6, vs("k") + vs(text))):
            data = update(5, 0, [content])
            if ok:
                validate_update(data)
            else:
                assert_invalid(data, "nesting too deep")
    mixed = '{"a": [' * 40 + "1" + "]}" * 40
    assert_invalid(update(5, 0, [root_item(5, vs(mixed))]), "nesting too deep")
    validate_update(update(5, 0, [root_item(5, vs(mixed))]), max_depth=80)


def test_deep_type_nesting_rejected() -> None:
    validate_update(nested_maps_update(64))
    assert_invalid(nested_maps_update(65), "nesting too deep")
    started = time.perf_counter()
    assert_invalid(nested_maps_update(100_000), "nesting too deep")
    assert time.perf_counter() - started < 5


def test_deep_type_nesting_in_reverse_client_order() -> None:
    """A chain of types split over clients whose sections come child-first (as Yjs orders
    clients by descending id): depth must not depend on the order structs are seen in."""
    depth = 70
    sections = []
    for level in range(depth):
        client = 1000 - level  # each level created by its own client, listed deepest first
        if level == 0:
            struct = root_item(7, vu(1), name="m", key="k")
        else:
            struct = child_item(7, vu(1), (client + 1, 0), "k")
        sections.append((client, struct))
    sections.sort()  # ascending client ids: the deepest level comes first
    body = b"".join(vu(1) + vu(c) + vu(0) + s for c, s in sections)
    data = vu(len(sections)) + body + b"\x00"
    validate_update(data, max_depth=depth)
    assert_invalid(data, "nesting too deep", max_depth=depth - 1)


def sections(*parts: tuple[int, list[bytes]]) -> bytes:
    """An update from several (client, structs) sections, each starting at clock 0."""
    body = b"".join(vu(len(structs)) + vu(client) + vu(0) + b"".join(structs) for client, structs in parts)
    return vu(len(parts)) + body + b"\x00"


def test_references_to_later_clocks_of_the_same_client_rejected() -> None:
    later = "later clock of its own client"
    assert_invalid(update(5, 0, [b"\x84" + vu(5) + vu(0) + vs("x")]), later)  # origin: itself
    assert_invalid(update(5, 3, [b"\x44" + vu(5) + vu(9) + vs("x")]), later)  # right origin
    assert_invalid(update(5, 0, [child_item(7, vu(1), (5, 0), "k")]), later)  # parent: itself
    validate_update(update(5, 3, [b"\xc4" + vu(5) + vu(2) + vu(6) + vu(0) + vs("x")]))


def test_parent_cycles_rejected() -> None:
    """Ids of other clients may point anywhere, so cycles can still be written across clients."""
    a = child_item(7, vu(1), (6, 0), "k")  # (5, 0), parent (6, 0)
    b = child_item(7, vu(1), (5, 0), "k")  # (6, 0), parent (5, 0)
    assert_invalid(sections((5, [a]), (6, [b])), "ancestors", max_depth=1)
    left_of_other = b"\x84" + vu(6) + vu(0) + vs("x")  # (5, 0), origin (6, 0)
    left_of_first = b"\x84" + vu(5) + vu(0) + vs("y")  # (6, 0), origin (5, 0)
    type_after = b"\x87" + vu(5) + vu(0) + vu(1)  # (5, 1): a Map whose origin is (5, 0)
    nested = child_item(7, vu(1), (5, 1), "k")  # (5, 2)
    data = sections((5, [left_of_other, type_after, nested]), (6, [left_of_first]))
    assert_invalid(data, "ancestors", max_depth=1)


# --------------------------------------------------------------------------------------------
# json_depth


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("", 0),
        ("1", 0),
        ("[]", 1),
        ('{"a": [1, {"b": []}]}', 4),
        ('"[[[{{{"', 0),
        ('["]]]", ["\\"[[["]]', 2),
        ('{"k\\\\": [["\\\\"]]}', 3),
        ('"[unterminated', 0),
        ("[[", 2),
        ("]]]][", 1),
        ("]][[]]][[[", 3),
        ("[]]]", 1),
    ],
)
def test_json_depth(text: str, depth: int) -> None:
    assert json_depth(text) == depth


def test_json_depth_is_linear_on_hostile_text() -> None:
    for text in ('"\\"' * 300_000, '"' + "\\" * 600_000, "[" * 600_000, '"' * 600_000):
        started = time.perf_counter()
        json_depth(text)
        assert time.perf_counter() - started < 0.5


@given(json_values)
def test_json_depth_matches_python_structure(value: object) -> None:
    def depth(v: object) -> int:
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        return 0

    if isinstance(value, bytes):
        value = value.hex()
    text = json.dumps(value, default=lambda b: b.hex())
    assert json_depth(text) == depth(json.loads(text))


# --------------------------------------------------------------------------------------------
# Fuzzing: nothing but None or InvalidUpdate, ever


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    validates_or_rejects(data)
    try:
        validate_state_vector(data)
    except InvalidUpdate:
        pass


def mutate(data: bytes, choices: st.DataObject) -> bytes:
    buf = bytearray(data)
    for _ in range(choices.draw(st.integers(1, 4))):
        kind = choices.draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "dup"]))
        at = choices.draw(st.integers(0, max(0, len(buf) - 1)))
        if kind == "flip" and buf:
            buf[at] ^= 1 << choices.draw(st.integers(0, 7))
        elif kind == "set" and buf:
            buf[at] = choices.draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0x75, 0x76, 0x77, 7, 8]))
        elif kind == "truncate":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = choices.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del buf[at : at + choices.draw(st.integers(1, 8))]
        elif kind == "dup":
            buf[at:at] = buf[at : at + choices.draw(st.integers(1, 16))]
    return bytes(buf)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_mutated_real_updates(yjs_updates: dict[str, bytes], data: st.DataObject) -> None:
    samples = real_samples(yjs_updates)
    original = data.draw(st.sampled_from(samples))
    validates_or_rejects(mutate(original, data))


# --------------------------------------------------------------------------------------------
# Why this exists: pycrdt dies on deep nesting (run in a subprocess, with the usual 8 MiB stack)

PYCRDT_CHILD = """
import sys, pycrdt
data = sys.stdin.buffer.read()
doc = pycrdt.Doc()
doc.apply_update(data)
print("applied", flush=True)
print(len(str(doc.get("m", type=pycrdt.Map))), flush=True)
print("rendered", flush=True)
"""


def limited_stack() -> None:
    """In the child: the common 8 MiB main-thread stack, and no core file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    limit = 8 * 2**20 if hard == resource.RLIM_INFINITY else min(8 * 2**20, hard)
    resource.setrlimit(resource.RLIMIT_STACK, (limit, hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_pycrdt(data: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PYCRDT_CHILD],
        input=data.decode("latin-1"),
        encoding="latin-1",
        capture_output=True,
        timeout=120,
        preexec_fn=limited_stack,
    )


def test_pycrdt_crashes_on_deep_any_and_the_validator_rejects_it() -> None:
    data = update(5, 0, [root_item(8, vu(1) + nested_any_arrays(100_000), name="m", key="k")])
    assert len(data) < 210_000
    proc = run_pycrdt(data)
    # pycrdt 0.14 (yrs) decodes Any recursively: the process is killed by SIGSEGV while
    # applying a 200 KB update, before "applied" is printed.
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stdout, proc.stderr[-500:])
    assert "applied" not in proc.stdout
    assert_invalid(data, "nesting too deep")


def test_pycrdt_crashes_rendering_deep_types_and_the_validator_rejects_them() -> None:
    data = nested_maps_update(100_000)
    proc = run_pycrdt(data)
    # apply_update accepts the chain of 100,000 nested maps; rendering it (str / to_json)
    # overflows the native stack and kills the process.
    assert "applied" in proc.stdout
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stdout, proc.stderr[-500:])
    assert_invalid(data, "nesting too deep")


def test_pycrdt_accepts_what_the_validator_accepts_at_the_limit() -> None:
    """At max_depth the same shapes are harmless to pycrdt."""
    for data in (
        update(5, 0, [root_item(8, vu(1) + nested_any_arrays(64), name="m", key="k")]),
        nested_maps_update(64),
    ):
        validate_update(data)
        proc = run_pycrdt(data)
        assert proc.returncode == 0 and "rendered" in proc.stdout, proc.stderr[-500:]


PYCRDT_SEQUENCES_CHILD = """
import json, sys, pycrdt
failures = []
for index, sequence in enumerate(json.load(sys.stdin)):
    print(index, flush=True)  # the last index printed names the input if the process dies
    doc = pycrdt.Doc()
    try:
        for data in sequence:
            try:
                doc.apply_update(bytes.fromhex(data))
            except Exception:
                pass
            doc.get_update()
            for name in ("a", "m", "t"):
                try:
                    str(doc.get(name, type=pycrdt.Map))
                except Exception:
                    pass
    except BaseException as exc:  # pyo3's PanicException is a BaseException
        failures.append([index, type(exc).__name__, str(exc)[:200]])
print(json.dumps(failures))
"""


def run_pycrdt_sequences(sequences: list[list[bytes]]) -> tuple[int, list, str]:
    """Apply each sequence of updates to a fresh pycrdt Doc in one subprocess."""
    proc = subprocess.run(
        [sys.executable, "-c", PYCRDT_SEQUENCES_CHILD],
        input=json.dumps([[u.hex() for u in seq] for seq in sequences]),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limited_stack,
    )
    lines = proc.stdout.splitlines()
    failures = json.loads(lines[-1]) if proc.returncode == 0 else []
    last = lines[-1] if lines else ""
    return proc.returncode, failures, last


def test_pycrdt_panics_on_empty_structs_and_the_validator_rejects_them() -> None:
    """yrs panics ("attempt to divide by zero", "unwrap() on a None value") on zero-length
    blocks; the panic surfaces as pyo3's PanicException, a BaseException that slips past
    `except Exception`, and it leaves the document broken (every later get_update panics)."""
    empty_gc = update(1, 1, [b"\x00" + vu(0)])
    pending = update(3, 4, [root_item(4, vs("a"), name="m")])
    empty_string = update(3, 0, [b"\x44" + vu(2) + vu(7) + vs("")])  # right origin (2, 7)
    empty_any = update(1, 4, [b"\x48" + vu(3) + vu(12) + vu(0)])
    sequences = [[empty_gc], [pending, empty_string], [update(1, 4, [root_item(1, vu(1))]), empty_any]]
    returncode, failures, _ = run_pycrdt_sequences(sequences)
    assert returncode == 0
    assert [f[0] for f in failures] == [0, 1, 2], failures
    assert all(f[1] == "PanicException" for f in failures), failures
    for data in (empty_gc, empty_string, empty_any):
        assert_invalid(data, "empty struct")


def random_update(rng: random.Random) -> bytes:
    """A random, well-formed update over a few clients, clocks, roots and content kinds."""

    def some_id() -> bytes:
        return vu(rng.randint(1, 3)) + vu(rng.randint(0, 12))

    def struct() -> bytes:
        roll = rng.random()
        if roll < 0.08:
            return bytes([rng.choice([0, 10])]) + vu(rng.randint(1, 3))  # GC / Skip
        ref = rng.choice([1, 3, 4, 4, 4, 5, 6, 7, 7, 8, 8, 9])
        shape = rng.choice(["root", "parent", "origin", "right", "both"])
        keyed = shape in ("root", "parent") and rng.random() < 0.5
        info = ref | {"origin": 0x80, "right": 0x40, "both": 0xC0}.get(shape, 0) | (0x20 if keyed else 0)
        out = bytes([info])
        if shape in ("origin", "both"):
            out += some_id()
        if shape in ("right", "both"):
            out += some_id()
        if shape == "root":
            out += vu(1) + vs(rng.choice("amt"))
        elif shape == "parent":
            out += vu(0) + some_id()
        if keyed:
            out += vs(rng.choice("kx"))
        type_ref = rng.randint(0, 6)
        return out + {
            1: vu(rng.randint(1, 3)),
            3: vs(b"ab"),
            4: vs(rng.choice(["a", "ab😀", "xyz"])),
            5: vs('{"a":1}'),
            6: vs("bold") + vs(rng.choice(["true", "null"])),
            7: vu(type_ref) + (vs("p") if type_ref in (3, 5) else b""),
            8: vu(2) + b"\x7e\x77\x01x",
            9: vs("guid") + b"\x76\x00",
        }[ref]

    clients = rng.sample([1, 2, 3], rng.randint(0, 3))
    out = vu(len(clients))
    for client in clients:
        structs = [struct() for _ in range(rng.randint(1, 4))]
        out += vu(len(structs)) + vu(client) + vu(rng.randint(0, 6)) + b"".join(structs)
    deletes = rng.sample([1, 2, 3], rng.randint(0, 2))
    out += vu(len(deletes))
    for client in deletes:
        out += vu(client) + vu(1) + vu(rng.randint(0, 10)) + vu(rng.randint(1, 3))
    return out


def test_what_the_validator_accepts_does_not_break_pycrdt(yjs_updates: dict[str, bytes]) -> None:
    """Deterministic fuzz: single random well-formed updates and mutations of real updates that
    the validator accepts are applied to fresh pycrdt docs (in a subprocess): no panic, no crash.
    (Sequences of several out-of-order updates are a stateful matter; see the module notes.)"""
    rng = random.Random(20240613)
    accepted: list[list[bytes]] = []
    samples = real_samples(yjs_updates)
    while len(accepted) < 1500:
        if rng.random() < 0.5:
            data = random_update(rng)
        else:
            mutant = bytearray(rng.choice(samples))
            at = rng.randrange(len(mutant))
            mutant[at] ^= 1 << rng.randrange(8)
            data = bytes(mutant)
        if validates_or_rejects(data):
            accepted.append([data])
    returncode, failures, last = run_pycrdt_sequences(accepted)
    assert returncode == 0, f"pycrdt died ({returncode}) on input {last}: {accepted[int(last)]!r}"
    assert failures == []
