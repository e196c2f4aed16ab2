"""Folding a snapshot and updates into one update (``fold_updates``, ``FoldCache``): nothing lost.

Compaction replaces a room's snapshot with the fold, so a fold that dropped anything would lose it
for good. The property every test checks: the fold, applied to a fresh Doc together with the updates
not folded yet (in any order), gives the same document as applying every update.
"""

from __future__ import annotations

import random
import threading

import pycrdt
import pytest

from storage import fold_updates
from storage.base import FOLD_CHUNK, FoldCache, _StateSet


def edits(seed: int, writers: int = 3, count: int = 300) -> list[bytes]:
    """Updates of ``writers`` peers editing one text (inserts and deletes of each other's text),
    in the order they were made; each peer has seen everything before its edit."""
    rnd = random.Random(seed)
    docs = [pycrdt.Doc(client_id=1000 + n) for n in range(writers)]
    texts = [d.get("t", type=pycrdt.Text) for d in docs]
    out: list[bytes] = []
    for n in range(count):
        w = rnd.randrange(writers)
        doc, text = docs[w], texts[w]
        captured: list[bytes] = []
        sub = doc.observe(lambda event: captured.append(bytes(event.update)))
        with doc.transaction():
            length = len(text)
            if length > 5 and rnd.random() < 0.35:
                start = rnd.randrange(length - 1)
                del text[start:start + rnd.randint(1, min(4, length - start))]
            else:
                text.insert(rnd.randint(0, length), f"<{w}.{n}>")
        doc.unobserve(sub)
        if captured:
            out.append(captured[0])
            for other in docs:
                if other is not doc:
                    other.apply_update(captured[0])
    return out


def document(*updates: bytes | None) -> tuple[str, bytes]:
    """Text and state vector of a Doc given all of ``updates``, in whatever order they come.

    They are merged and applied as one update: a Doc applying them one by one out of causal order
    may keep some pending even once their dependencies arrived (y-crdt integrates pending structs
    only on some later applies), which would hide what the updates hold.
    """
    present = [u for u in updates if u is not None]
    doc = pycrdt.Doc()
    if present:
        doc.apply_update(pycrdt.merge_updates(*present) if len(present) > 1 else present[0])
    return str(doc.get("t", type=pycrdt.Text)), doc.get_state()


def folds(cache: FoldCache | None) -> list:
    return [fold_updates] if cache is None else [lambda s, u: cache.fold("room", s, u)]


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("order", ["in order", "some late", "shuffled"])
@pytest.mark.parametrize("seed", range(3))
def test_folding_in_any_order_at_any_point_loses_nothing(seed: int, order: str, cached: bool) -> None:
    updates = edits(seed)
    final = document(*updates)
    rnd = random.Random(seed)
    delivered = updates[:]
    if order == "shuffled":  # structs wait for their predecessors, deletes for their items
        rnd.shuffle(delivered)
    elif order == "some late":
        for _ in range(20):
            delivered.append(delivered.pop(rnd.randrange(len(delivered))))
    delivered += rnd.sample(updates, 10)  # duplicates (a client resending) are harmless
    cache = FoldCache() if cached else None
    (fold,) = folds(cache)
    snapshot: bytes | None = None
    position = 0
    while position < len(delivered):
        step = rnd.randint(1, 3 * FOLD_CHUNK)  # across chunk boundaries
        snapshot = fold(snapshot, delivered[position:position + step])
        position += step
        # Nothing folded so far is lost: the snapshot plus the rest gives the whole document.
        assert document(snapshot, *delivered[position:]) == final
    assert document(snapshot) == final
    if cache is not None and order == "in order":
        assert cache.hits > 0 and cache.misses == 1


def test_pending_structs_and_deletes_are_kept_until_they_integrate() -> None:
    doc = pycrdt.Doc()
    text = doc.get("t", type=pycrdt.Text)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    text.insert(0, "abc")
    text.insert(3, "def")
    del text[0:1]
    first, second, deletion = updates

    cache = FoldCache()
    snapshot = cache.fold("r", None, [second])  # builds on "abc", which the store never saw
    assert len(cache) == 0  # a Doc that could not hold all of its fold is not kept
    snapshot = cache.fold("r", snapshot, [deletion])  # deletes "a", not seen either
    assert len(cache) == 0 and document(snapshot)[0] == ""
    snapshot = cache.fold("r", snapshot, [first])
    assert document(snapshot)[0] == "bcdef"
    assert len(cache) == 1  # now everything integrated
    assert fold_updates(snapshot, []) == snapshot or document(fold_updates(snapshot, []))[0] == "bcdef"


def test_a_kept_doc_is_used_only_for_the_exact_snapshot_it_made() -> None:
    updates = edits(7, count=60)
    mine, theirs = FoldCache(), FoldCache()
    s1 = mine.fold("r", None, updates[:20])
    assert (mine.hits, mine.misses, len(mine)) == (0, 1, 1)
    s2 = mine.fold("r", s1, updates[20:30])  # our own snapshot: the kept Doc is reused
    assert (mine.hits, mine.misses) == (1, 1)
    assert document(s2) == document(*updates[:30])

    # Another node (or a race we lost) moved the snapshot on: our Doc must not be used.
    s3 = theirs.fold("r", s2, updates[30:45])
    s4 = mine.fold("r", s3, updates[45:])
    assert (mine.hits, mine.misses) == (1, 2)
    assert document(s4) == document(*updates)
    assert mine.fold("other room", s4, []) and mine.misses == 3  # per room


def test_a_failed_fold_drops_the_kept_doc() -> None:
    updates = edits(8, count=40)
    cache = FoldCache()
    s1 = cache.fold("r", None, updates[:20])
    with pytest.raises(Exception):
        cache.fold("r", s1, [updates[20], b"\xff\xff\xff garbage"])
    assert len(cache) == 0
    s2 = cache.fold("r", s1, updates[20:])  # a fresh Doc: the half-applied one is gone
    assert (cache.hits, cache.misses) == (1, 2)
    assert document(s2) == document(*updates)


def test_the_cache_is_bounded() -> None:
    updates = edits(9, count=30)
    sizes = {}
    cache = FoldCache(max_rooms=3)
    for room in "abcd":
        sizes[room] = len(cache.fold(room, None, updates))
    assert len(cache) == 3  # "a" went first
    cache.fold("a", None, updates)
    assert cache.hits == 0
    budget = FoldCache(max_bytes=2 * sizes["a"] + 1)
    for room in "abc":
        budget.fold(room, None, updates)
    assert len(budget) == 2
    off = FoldCache(max_bytes=0)
    snapshot = off.fold("r", None, updates)
    assert len(off) == 0 and document(off.fold("r", snapshot, [])) == document(*updates)
    with pytest.raises(ValueError):
        FoldCache(max_bytes=-1)


def test_concurrent_folds_of_one_room_never_share_a_doc() -> None:
    # Five peers branch off one document and edit it concurrently; each thread folds the shared
    # snapshot with one peer's edits. A Doc shared between two folds would leak edits across.
    origin = pycrdt.Doc(client_id=1)
    origin.get("t", type=pycrdt.Text).insert(0, "shared start")
    cache = FoldCache()
    base = cache.fold("r", None, [origin.get_update()])
    branches: list[list[bytes]] = []
    for n in range(5):
        peer = pycrdt.Doc(client_id=10 + n)
        peer.apply_update(base)
        text = peer.get("t", type=pycrdt.Text)
        branch: list[bytes] = []
        peer.observe(lambda event, branch=branch: branch.append(bytes(event.update)))
        for k in range(100):
            text.insert(len(text) // 2, f"[{n}.{k}]")
        branches.append(branch)
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(5)

    def worker(n: int) -> None:
        try:
            start.wait()
            results[n] = cache.fold("r", base, branches[n])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 5
    for n, folded in results.items():  # each holds exactly the base and its own branch
        assert document(folded) == document(base, *branches[n])
    assert len(cache) == 1


def covers_reference(diff: bytes, state: bytes) -> bool:
    """The check in plain Python: no structs, and every deleted range below the state vector."""
    def var(data: bytes, pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, pos

    count, pos = var(state, 0)
    known = {}
    for _ in range(count):
        client, pos = var(state, pos)
        known[client], pos = var(state, pos)
    clients, pos = var(diff, 0)
    if clients:
        return False
    ds_clients, pos = var(diff, pos)
    for _ in range(ds_clients):
        client, pos = var(diff, pos)
        ranges, pos = var(diff, pos)
        for _ in range(ranges):
            clock, pos = var(diff, pos)
            length, pos = var(diff, pos)
            if clock + length > known.get(client, 0):
                return False
    return True


def test_the_coverage_check_matches_the_plain_python_one() -> None:
    rnd = random.Random(11)
    updates = edits(11, writers=4, count=400)
    seen = 0
    for _ in range(40):
        doc = pycrdt.Doc()
        for update in rnd.sample(updates, rnd.randrange(1, len(updates))):
            doc.apply_update(update)
        state = doc.get_state()
        check = _StateSet(state)
        for update in rnd.sample(updates, 20) + [pycrdt.merge_updates(*rnd.sample(updates, 30))]:
            diff = pycrdt.get_update(update, state)
            expected = covers_reference(diff, state)
            assert check.covers(diff) == expected
            seen += expected
    assert 0 < seen < 40 * 21  # both answers were exercised
