"""``apply_update``: pycrdt's ``Doc.apply_update`` without its Python transaction wrapper, when
nothing can tell the difference.

``Doc.apply_update`` opens a Python ``Transaction`` (origin bookkeeping, an optional lock, the
nesting count, observer-exception collection) around two calls into yrs. For a room's document —
no model, no lock, no document observer, no transaction already open — all of that is a no-op,
and it is half of what applying a typing-sized update costs (3.3 → 1.7 µs for a 33-byte update):
the room applies every update it is sent. Any other document, or a room's document while
``Room.change`` observes it or a burst holds a transaction open, takes pycrdt's own path. The
private attributes read here are pycrdt 0.14's (pinned in pyproject.toml); ``tests/collab/
test_ydoc.py`` checks both paths agree, including on updates yrs refuses.
"""

from __future__ import annotations

import pycrdt


def apply_update(doc: pycrdt.Doc, update: bytes) -> None:
    if (doc._txn is not None or doc._subscriptions or doc._Model is not None
            or doc._allow_multithreading or doc._exceptions):
        doc.apply_update(update)
        return
    inner = doc._doc
    txn = inner.create_transaction()
    try:
        inner.apply_update(txn, update)
        txn.commit()
    finally:
        txn.drop()
    if doc._exceptions:  # a shared type's observer failed: raised as pycrdt raises it
        exceptions = tuple(doc._exceptions)
        doc._exceptions.clear()
        raise ExceptionGroup("Observer callback error", exceptions)
