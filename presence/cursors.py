"""Cursors and selections: Yjs relative positions in awareness, resolved to absolute offsets.

The y-codemirror / y-prosemirror convention is ``state.cursor = {anchor, head}``, each a Yjs
``RelativePosition`` serialised as JSON: ``{"type": ID|null, "tname": str|null, "item": ID|null,
"assoc": int}`` with ``ID = {"client", "clock"}`` (``Y.relativePositionToJSON`` omits the null
fields). pycrdt's ``StickyIndex`` reads the same JSON and resolves it against the server's Doc,
so a cursor follows concurrent edits exactly as it does in the clients.

The positions come from clients, and pycrdt panics (a Rust ``unwrap``) on a position naming an
item or a root type the document does not have: everything is checked against the document's
state vector and root names first, and anything left is caught. A position that cannot be
resolved is reported as ``null``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pycrdt

from collab.protocol import read_var_uint

MAX_CLIENT = (1 << 53) - 1
MAX_CLOCK = (1 << 32) - 1
_FIELDS = frozenset({"type", "tname", "item", "assoc"})


@dataclass(frozen=True, slots=True)
class Resolver:
    """Resolves many positions against one document state (one transaction, one state vector)."""

    doc: pycrdt.Doc
    clocks: dict[int, int]
    roots: frozenset[str]

    @classmethod
    def of(cls, doc: pycrdt.Doc) -> Resolver:
        return cls(doc, state_vector(doc.get_state()), frozenset(doc.keys()))

    def _known(self, ident: Any) -> bool:
        if not isinstance(ident, dict) or set(ident) != {"client", "clock"}:
            return False
        client, clock = ident["client"], ident["clock"]
        if type(client) is not int or type(clock) is not int:
            return False
        if not (0 <= client <= MAX_CLIENT and 0 <= clock <= MAX_CLOCK):
            return False
        return clock < self.clocks.get(client, 0)

    def position(self, rel: Any) -> tuple[int | None, str | None]:
        """(absolute index or None, root type name if the position names one)."""
        if not isinstance(rel, dict) or not rel or not set(rel) <= _FIELDS:
            return None, None
        assoc = rel.get("assoc", 0)
        if type(assoc) is not int or not -(1 << 31) <= assoc < (1 << 31):
            return None, None
        tname = rel.get("tname")
        item, typ = rel.get("item"), rel.get("type")
        clean: dict[str, Any] = {"assoc": assoc}
        if tname is not None:
            if not isinstance(tname, str) or tname not in self.roots:
                return None, None
            clean["tname"] = tname
        if item is not None:
            if not self._known(item):
                return None, tname
            clean["item"] = item
        elif tname is None:
            # A position in a nested type with no item: resolving it needs that type to be alive,
            # which pycrdt cannot tell us without panicking. Rare (an empty nested type); skip it.
            return None, None
        if typ is not None and not self._known(typ):
            return None, tname
        try:
            with self.doc.transaction() as txn:
                index = pycrdt.StickyIndex.from_json(clean).get_index(txn)
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return None, tname
        return (index if isinstance(index, int) and index >= 0 else None), tname

    def cursor(self, state: Any) -> dict[str, Any] | None:
        """``{"anchor", "head", "from", "to", "type"}`` for a state with a y-codemirror cursor."""
        if not isinstance(state, dict):
            return None
        cursor = state.get("cursor")
        if not isinstance(cursor, dict) or "anchor" not in cursor or "head" not in cursor:
            return None
        anchor, t1 = self.position(cursor["anchor"])
        head, t2 = self.position(cursor["head"])
        out: dict[str, Any] = {"anchor": anchor, "head": head, "type": t1 or t2}
        if anchor is not None and head is not None:
            out["from"], out["to"] = min(anchor, head), max(anchor, head)
        return out


def state_vector(data: bytes) -> dict[int, int]:
    count, pos = read_var_uint(data, 0)
    clocks = {}
    for _ in range(count):
        client, pos = read_var_uint(data, pos)
        clock, pos = read_var_uint(data, pos)
        clocks[client] = clock
    return clocks
