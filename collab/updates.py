"""Validation of untrusted Yjs update (v1) bytes and state vectors, before pycrdt sees them.

Theory of operation
-------------------
pycrdt hands update bytes to yrs (Rust), whose decoder recurses on nested content: an update of
about 50 KiB holding ~26,000 nested ``Any`` arrays overflows the native stack and kills the whole
server process (SIGSEGV), and a deep chain of nested shared types is accepted but crashes the
process later, when the document is rendered (``str(map)`` / ``to_json``). yrs also silently
truncates clocks above 2**32 and client ids above 2**53, and Yjs browsers throw on refs they do
not know. So every update a client sends is parsed here first, by a single forward scan over the
lib0 encoding (the layout of yjs 13.6 ``readClientsStructRefs`` / ``readDeleteSet`` /
``readItemContent`` / lib0 ``readAny``), and rejected with :class:`InvalidUpdate` unless it is
well-formed and inside these limits:

* Every read is bounds-checked and the buffer must be consumed exactly: truncated frames and
  trailing garbage are rejected (no "partial" update ever reaches the CRDT).
* varints are at most 8 bytes and at most 2**53 - 1 (JS safe integers): bounds pycrdt's
  quadratic Python varint decoder and forged "integers" that are really megabytes of 0x80 bytes.
* Every count (clients, structs, delete ranges, JSON entries, Any array/object sizes) must be
  plausible against the bytes that remain (each element needs at least one byte) and every
  string/binary length must fit in the buffer: a tiny frame can neither make a loop run long nor
  make anyone allocate much. Each loop iteration consumes at least one byte, so the scan is
  O(len(data)) whatever the input says.
* Clocks and clock ranges (struct ids, origins, delete-set ranges, state vectors) stay below
  2**32 (yrs stores them as u32 and silently wraps larger ones); client ids stay below 2**53.
* Nesting is bounded by ``max_depth`` (default 64) in three places: ``Any`` arrays/objects
  (the yrs stack-overflow crash), JSON text inside JSON/Embed/Format content (``json_depth``),
  and shared types created inside shared types of the same update (the render-time crash; depth is
  followed through explicit parent ids and through origin/right-origin ids, whose items inherit
  their neighbour's parent). Nesting is measured with explicit counters and stacks, never Python
  recursion, so hostile input cannot hit the recursion limit here either.
* Content refs, type refs and ``Any`` tags unknown to Yjs 13.6 are rejected (a Yjs client that
  received them would throw); strings must be valid UTF-8; JSON must be valid JSON as JavaScript's
  ``JSON.parse`` reads it (no NaN/Infinity), or "undefined" inside legacy JSON content.
* Shapes that no Yjs/yrs encoder writes and that make yrs panic (pyo3's PanicException, a
  BaseException that slips past ``except Exception`` and leaves the document unusable) or recurse
  without end are rejected: zero-length structs (GC/Skip/Deleted of length 0, "" strings, empty
  Any/JSON lists), client sections without structs, empty delete ranges, and items whose origin,
  right origin or parent is a clock of their own client that is not earlier than their own (those
  existed before the item, so their clocks are smaller).
* A client id appears at most once in the struct section (Yjs would keep only the last one, which
  would let an update say different things to different readers).

The scan never walks strings, binaries or JSON texts byte by byte in Python: they are sliced and
checked by C code (``bytes.isascii``, ``bytes.decode``, ``json.loads``, ``re``). Origins mostly
repeat the same few client ids, 5-8 byte varints, so those are compared as bytes first.

When the optional C extension ``collab._fastscan`` is built (``setup.py``; :data:`NATIVE_SCAN`),
``validate_update`` runs that instead of the first (no-graph) Python scan: a port of
``_scan_update(data, max_depth, None)`` with the same checks in the same order and the same
messages (tests/collab/test_fastscan.py compares the two). It settles plainly valid JSON texts
itself and hands every other JSON text to ``_check_json``; updates with more type items than
``max_depth`` still go through the Python graph scan.

Not covered, because a stateless check cannot see it:

* nesting built up across *several* updates (each within ``max_depth``, each parented on the
  previous one's deepest type);
* yrs bugs on updates applied out of order: several individually valid updates that leave structs
  pending (a gap before a client's section start, or ids beyond the document's state) can still
  crash yrs when a later update fills the gap. A caller that knows the document's state vector
  should refuse updates that would leave structs pending.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from itertools import accumulate
from operator import sub

__all__ = ["InvalidUpdate", "validate_update", "validate_state_vector", "json_depth"]

MAX_SAFE_INTEGER = 2**53 - 1
"""Largest integer a varint may hold (JavaScript's Number.MAX_SAFE_INTEGER)."""
MAX_CLOCK = 2**32 - 1
"""Largest clock (and clock + length) accepted: yrs keeps clocks in a u32."""
DEFAULT_MAX_DEPTH = 64

_NOT_ASTRAL_LEADS = bytes(range(0xF0))  # deleting these leaves the lead bytes of 4-byte sequences


class InvalidUpdate(ValueError):
    """Raised for malformed or over-limit input; str(exc) is a short, safe, human reason (no raw bytes)."""


def _too_deep() -> InvalidUpdate:
    return InvalidUpdate("nesting too deep")


# --------------------------------------------------------------------------------------------
# lib0 primitives. Hot paths inline the one-byte case (`b < 0x80`) and call these for the rest.
# An IndexError anywhere means a read past the end; the public entry points turn it into
# InvalidUpdate("truncated").


def _varuint_tail(data: bytes, pos: int, first: int) -> tuple[int, int]:
    """Finish a varUint whose first byte `first` (>= 0x80) was read; `pos` is just after it.

    Unrolled: this is the hottest function for real updates (clocks, 5-8 byte client ids).
    """
    num = first & 0x7F
    b = data[pos]
    if b < 0x80:
        return num | (b << 7), pos + 1
    num |= (b & 0x7F) << 7
    b = data[pos + 1]
    if b < 0x80:
        return num | (b << 14), pos + 2
    num |= (b & 0x7F) << 14
    b = data[pos + 2]
    if b < 0x80:
        return num | (b << 21), pos + 3
    num |= (b & 0x7F) << 21
    b = data[pos + 3]
    if b < 0x80:
        return num | (b << 28), pos + 4
    num |= (b & 0x7F) << 28
    b = data[pos + 4]
    if b < 0x80:
        return num | (b << 35), pos + 5
    num |= (b & 0x7F) << 35
    b = data[pos + 5]
    if b < 0x80:
        return num | (b << 42), pos + 6
    num |= (b & 0x7F) << 42
    b = data[pos + 6]
    if b < 0x80:
        num |= b << 49
        if num > MAX_SAFE_INTEGER:
            raise InvalidUpdate("integer out of range")
        return num, pos + 7
    raise InvalidUpdate("varint longer than 8 bytes")


def _read_varuint(data: bytes, pos: int) -> tuple[int, int]:
    b = data[pos]
    if b < 0x80:
        return b, pos + 1
    return _varuint_tail(data, pos + 1, b)


def _skip_varint(data: bytes, pos: int) -> int:
    """Skip a lib0 signed varInt (6 value bits + sign in the first byte); return the new pos."""
    b = data[pos]
    pos += 1
    if b < 0x80:
        return pos
    num = b & 0x3F
    shift = 6
    for _ in range(7):
        b = data[pos]
        pos += 1
        num |= (b & 0x7F) << shift
        if b < 0x80:
            if num > MAX_SAFE_INTEGER:
                raise InvalidUpdate("integer out of range")
            return pos
        shift += 7
    raise InvalidUpdate("varint longer than 8 bytes")


def _string_end(data: bytes, pos: int) -> int:
    """Validate the varString at `pos` (length + UTF-8 bytes); return the position after it."""
    n = data[pos]
    pos += 1
    if n >= 0x80:
        n, pos = _varuint_tail(data, pos, n)
    end = pos + n
    if end > len(data):
        raise InvalidUpdate("truncated")
    if n:
        raw = data[pos:end]
        if not raw.isascii():
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidUpdate("invalid UTF-8") from None
    return end


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    n = data[pos]
    pos += 1
    if n >= 0x80:
        n, pos = _varuint_tail(data, pos, n)
    end = pos + n
    if end > len(data):
        raise InvalidUpdate("truncated")
    try:
        return data[pos:end].decode("utf-8"), end
    except UnicodeDecodeError:
        raise InvalidUpdate("invalid UTF-8") from None


def _buffer_end(data: bytes, pos: int) -> int:
    """Skip a varUint8Array; return the position after it."""
    n = data[pos]
    pos += 1
    if n >= 0x80:
        n, pos = _varuint_tail(data, pos, n)
    end = pos + n
    if end > len(data):
        raise InvalidUpdate("truncated")
    return end


def _plausible(count: int, data: bytes, pos: int, min_bytes: int = 1) -> None:
    if count * min_bytes > len(data) - pos:
        raise InvalidUpdate("count larger than the frame")


# --------------------------------------------------------------------------------------------
# JSON

_STRING_LITERAL = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)  # linear: no backtracking
_BRACKET = re.compile(r"[\[\]{}]")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}.__getitem__


def json_depth(text: str) -> int:
    """Maximum nesting depth of ``[`` / ``{`` outside JSON string literals ("1" -> 0, "[[]]" -> 2).

    Works on any text (valid JSON or not) in linear time, with no per-character Python code: an
    unterminated string literal runs to the end of the text; a closing bracket with nothing open
    is ignored.
    """
    if "[" not in text and "{" not in text:
        return 0
    if '"' in text:
        text = _STRING_LITERAL.sub("", text)
    levels = list(accumulate(map(_BRACKET_STEP, _BRACKET.findall(text))))
    if not levels:
        return 0
    floor = min(levels)
    if floor >= 0:
        return max(levels)
    # Unbalanced closers: the depth after each bracket is its level minus the lowest level
    # reached so far (or 0).
    lowest = accumulate(levels, min, initial=0)
    next(lowest)
    return max(0, max(map(sub, levels, lowest)))


def _reject_constant(name: str) -> None:
    raise ValueError(name)  # NaN / Infinity: Python accepts them, JSON.parse does not


def _check_json(text: str, max_depth: int) -> None:
    if json_depth(text) > max_depth:
        raise _too_deep()
    try:
        json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise InvalidUpdate("invalid JSON") from None


# --------------------------------------------------------------------------------------------
# lib0 Any


def _any_end(data: bytes, pos: int, count: int, max_depth: int) -> int:
    """Skip `count` consecutive lib0 Any values; return the position after them.

    Iterative: `stack` holds the (remaining, in_object) state of every enclosing array/object,
    so len(stack) is the nesting depth of the values being read.
    """
    stack: list[tuple[int, bool]] = []
    remaining = count
    in_object = False
    while True:
        if not remaining:
            if not stack:
                break
            remaining, in_object = stack.pop()
            continue
        remaining -= 1
        if in_object:
            pos = _string_end(data, pos)
        tag = data[pos]
        pos += 1
        if tag == 119:  # string
            pos = _string_end(data, pos)
        elif tag == 124:  # float32
            pos += 4
        elif tag == 123 or tag == 122:  # float64, bigint64
            pos += 8
        elif tag == 125:  # varInt
            pos = _skip_varint(data, pos)
        elif tag == 120 or tag == 121 or tag == 126 or tag == 127:  # true, false, null, undefined
            pass
        elif tag == 118 or tag == 117:  # object, array
            if len(stack) >= max_depth:
                raise _too_deep()
            n = data[pos]
            pos += 1
            if n >= 0x80:
                n, pos = _varuint_tail(data, pos, n)
            if n:
                # an object entry needs >= 2 bytes (key length + tag), an array element >= 1
                _plausible(n, data, pos, 2 if tag == 118 else 1)
                stack.append((remaining, in_object))
                remaining = n
                in_object = tag == 118
        elif tag == 116:  # Uint8Array
            pos = _buffer_end(data, pos)
        else:
            raise InvalidUpdate("unknown Any type tag")
        # fixed-size values skip without reading: a skip past the end fails at the next read
        # or at the final check below
    if pos > len(data):
        raise InvalidUpdate("truncated")
    return pos


# --------------------------------------------------------------------------------------------
# Nesting of shared types created by one update


class _TypeGraph:
    """The structs of one update, for measuring how deeply its new shared types nest.

    An Item's parent is either explicit (a root name, or the id of a ContentType item) or, when
    the Item has an origin / right origin, inherited from the neighbouring item those ids name.
    ``check`` computes, for every type item, how many type items of this update enclose it
    (itself included): a longest-path search over those links, iterative, memoised, with cycle
    detection. Ids that fall outside this update count as the document root (depth 0).

    Structs are stored in flat lists indexed by node number; the structs of one client section
    have consecutive node numbers, so an id is found by bisecting that section's start clocks.
    """

    def __init__(self) -> None:
        self.ends: list[int] = []  # clock after the struct
        self.is_type: list[bool] = []
        # (origin client, origin clock, right client, right clock, parent client, parent clock),
        # -1 where absent; None for GC / Skip
        self.refs: list[tuple[int, int, int, int, int, int] | None] = []
        self.sections: dict[int, tuple[int, list[int]]] = {}  # client -> (first node, starts)

    def section(self, client: int) -> list[int]:
        """Start a client section; return the list to append its struct start clocks to."""
        starts: list[int] = []
        self.sections[client] = (len(self.ends), starts)
        return starts

    def _find(self, client: int, clock: int) -> int:
        """The node holding id (client, clock), or -1."""
        section = self.sections.get(client)
        if section is None:
            return -1
        first, starts = section
        k = bisect_right(starts, clock) - 1
        if k < 0 or clock >= self.ends[first + k]:
            return -1
        return first + k

    def _links(self, node: int) -> list[tuple[int, int]]:
        """(other node, depth added) pairs: a node's container depth is the max over its links."""
        refs = self.refs[node]
        if refs is None:
            return []
        oc, ok, rc, rk, pc, pk = refs
        if pc >= 0:  # explicit parent: a type item of this update is one level up
            other = self._find(pc, pk)
            return [(other, 1)] if other >= 0 and self.is_type[other] else []
        links = []
        if oc >= 0:
            other = self._find(oc, ok)
            if other >= 0:
                links.append((other, 0))
        if rc >= 0:
            other = self._find(rc, rk)
            if other >= 0:
                links.append((other, 0))
        return links

    def check(self, max_depth: int) -> None:
        count = len(self.ends)
        is_type = self.is_type
        depth = [-1] * count  # depth of the type containing each node (0 = root/unknown)
        links: list[list[tuple[int, int]] | None] = [None] * count
        expanded = bytearray(count)
        for root in range(count):
            if not is_type[root] or depth[root] >= 0:
                continue
            stack = [root]
            while stack:
                node = stack[-1]
                if depth[node] >= 0:
                    stack.pop()
                    continue
                node_links = links[node]
                if node_links is None:
                    node_links = links[node] = self._links(node)
                if not expanded[node]:
                    expanded[node] = 1
                    for other, _ in node_links:
                        if depth[other] < 0:
                            if expanded[other]:  # unfinished and expanded: on the current path
                                raise InvalidUpdate("items are their own ancestors")
                            stack.append(other)
                    continue
                # every link was pushed above this node, so it is done
                d = 0
                for other, add in node_links:
                    if depth[other] + add > d:
                        d = depth[other] + add
                depth[node] = d
                if is_type[node] and d >= max_depth:
                    raise _too_deep()
                stack.pop()


# --------------------------------------------------------------------------------------------
# Updates

_NAMED_TYPE_REFS = (3, 5)  # YXmlElement (nodeName), YXmlHook (hookName): a varString follows
_MAX_TYPE_REF = 6  # YXmlText; Yjs 13.6 knows type refs 0..6 only
_CLOCK_RANGE = "clock out of range"
_COUNT = "count larger than the frame"
_EMPTY = "empty struct"


def _check_reference(ref_client: int, ref_clock: int, client: int) -> None:
    """An item refers to (ref_client, ref_clock), a clock not below its own: allowed only for
    another client (which may be ahead of this one), and within yrs' clock range."""
    if ref_client == client:
        # origin, right origin and parent existed when the item was created: for its own
        # client they have smaller clocks. yrs can recurse without end on such references.
        raise InvalidUpdate("item refers to a later clock of its own client")
    if ref_clock > MAX_CLOCK:
        raise InvalidUpdate(_CLOCK_RANGE)


class _NeedGraph(Exception):
    """Raised by a scan without a graph on meeting more than max_depth type items."""


def _scan_update(data: bytes, max_depth: int, graph: _TypeGraph | None) -> None:
    """Check a whole update (structs, delete set, nothing after it).

    With `graph`, also record every struct in it; without, raise _NeedGraph on meeting more
    than max_depth type items. Reads past the end raise IndexError. The one-byte case of hot
    varUints is inlined (`x = data[pos]; if x >= 0x80: <finish it>`).
    """
    n_data = len(data)
    num_clients = data[0]
    pos = 1
    if num_clients >= 0x80:
        num_clients, pos = _varuint_tail(data, pos, num_clients)
    if num_clients * 3 > n_data - pos:
        raise InvalidUpdate(_COUNT)
    seen: set[int] = set()
    types = 0
    for _ in range(num_clients):
        num_structs = data[pos]
        pos += 1
        if num_structs >= 0x80:
            num_structs, pos = _varuint_tail(data, pos, num_structs)
        start = pos
        client, pos = _read_varuint(data, pos)
        # Origins mostly name the same few clients, whose ids are 5-8 byte varints: compare the
        # bytes with the last client id read (one C call) before decoding them in Python.
        last_client = data[start:pos]
        last_client_id = client
        clock = data[pos]
        pos += 1
        if clock >= 0x80:
            clock, pos = _varuint_tail(data, pos, clock)
            if clock > MAX_CLOCK:
                raise InvalidUpdate(_CLOCK_RANGE)
        if num_structs * 2 > n_data - pos:  # info byte + at least one more byte each
            raise InvalidUpdate(_COUNT)
        if not num_structs:
            raise InvalidUpdate("empty client section")
        if num_clients > 1:
            if client in seen:
                raise InvalidUpdate("client listed twice")
            seen.add(client)
        if graph is not None:
            starts = graph.section(client)
            ends = graph.ends
            kinds = graph.is_type
            refs = graph.refs
        for _ in range(num_structs):
            info = data[pos]
            pos += 1
            ref = info & 0x1F
            if ref == 0 or ref == 10:  # GC, Skip
                length = data[pos]
                pos += 1
                if length >= 0x80:
                    length, pos = _varuint_tail(data, pos, length)
                if not length:
                    raise InvalidUpdate(_EMPTY)
                if graph is not None:
                    starts.append(clock)
                    ends.append(clock + length)
                    kinds.append(False)
                    refs.append(None)
                clock += length
                if clock > MAX_CLOCK:
                    raise InvalidUpdate(_CLOCK_RANGE)
                continue

            # ---- Item: origin, right origin, parent (kept only when recording a graph)
            oc = ok = rc = rk = pc = pk = -1
            if info & 0x80:
                if data.startswith(last_client, pos):
                    oc = last_client_id
                    pos += len(last_client)
                else:
                    start = pos
                    oc, pos = _read_varuint(data, pos)
                    last_client = data[start:pos]
                    last_client_id = oc
                ok = data[pos]
                pos += 1
                if ok >= 0x80:
                    ok, pos = _varuint_tail(data, pos, ok)
                if ok >= clock:
                    _check_reference(oc, ok, client)
            if info & 0x40:
                if data.startswith(last_client, pos):
                    rc = last_client_id
                    pos += len(last_client)
                else:
                    start = pos
                    rc, pos = _read_varuint(data, pos)
                    last_client = data[start:pos]
                    last_client_id = rc
                rk = data[pos]
                pos += 1
                if rk >= 0x80:
                    rk, pos = _varuint_tail(data, pos, rk)
                if rk >= clock:
                    _check_reference(rc, rk, client)
            if not info & 0xC0:
                parent_info = data[pos]
                pos += 1
                if parent_info >= 0x80:
                    parent_info, pos = _varuint_tail(data, pos, parent_info)
                if parent_info == 1:  # a root type, by name
                    pos = _string_end(data, pos)
                else:  # the id of a ContentType item
                    pc, pos = _read_varuint(data, pos)
                    pk, pos = _read_varuint(data, pos)
                    if pk >= clock:
                        _check_reference(pc, pk, client)
                if info & 0x20:  # parentSub: the key in a map
                    pos = _string_end(data, pos)

            # ---- content; `length` is the number of clock ticks the item covers
            is_type = False
            if ref == 4:  # String; its length counts UTF-16 code units, as in JavaScript
                n = data[pos]
                pos += 1
                if n >= 0x80:
                    n, pos = _varuint_tail(data, pos, n)
                end = pos + n
                if end > n_data:
                    raise InvalidUpdate("truncated")
                raw = data[pos:end]
                if raw.isascii():
                    length = n
                else:
                    try:
                        length = len(raw.decode("utf-8"))
                    except UnicodeDecodeError:
                        raise InvalidUpdate("invalid UTF-8") from None
                    length += len(raw.translate(None, _NOT_ASTRAL_LEADS))  # surrogate pairs
                pos = end
            elif ref == 8:  # Any
                length, pos = _read_varuint(data, pos)
                if length > n_data - pos:
                    raise InvalidUpdate(_COUNT)
                pos = _any_end(data, pos, length, max_depth)
            elif ref == 1:  # Deleted
                length, pos = _read_varuint(data, pos)
            elif ref == 6:  # Format: key, JSON value
                pos = _string_end(data, pos)
                text, pos = _read_string(data, pos)
                _check_json(text, max_depth)
                length = 1
            elif ref == 7:  # Type
                type_ref, pos = _read_varuint(data, pos)
                if type_ref > _MAX_TYPE_REF:
                    raise InvalidUpdate("unknown type ref")
                if type_ref in _NAMED_TYPE_REFS:
                    pos = _string_end(data, pos)
                is_type = True
                types += 1
                if types > max_depth and graph is None:
                    raise _NeedGraph  # start again, recording the structs this time
                length = 1
            elif ref == 5:  # Embed: JSON
                text, pos = _read_string(data, pos)
                _check_json(text, max_depth)
                length = 1
            elif ref == 3:  # Binary
                pos = _buffer_end(data, pos)
                length = 1
            elif ref == 2:  # JSON (legacy): `length` JSON texts, or "undefined"
                length, pos = _read_varuint(data, pos)
                if length > n_data - pos:
                    raise InvalidUpdate(_COUNT)
                for _ in range(length):
                    text, pos = _read_string(data, pos)
                    if text != "undefined":
                        _check_json(text, max_depth)
            elif ref == 9:  # Doc: guid, options
                pos = _string_end(data, pos)
                pos = _any_end(data, pos, 1, max_depth)
                length = 1
            else:
                raise InvalidUpdate("unknown content ref")
            if not length:  # "", [], Deleted(0): yrs panics on such blocks
                raise InvalidUpdate(_EMPTY)

            if graph is not None:
                starts.append(clock)
                ends.append(clock + length)
                kinds.append(is_type)
                refs.append((oc, ok, rc, rk, pc, pk))
            clock += length
            if clock > MAX_CLOCK:
                raise InvalidUpdate(_CLOCK_RANGE)

    # ---- delete set: per client, ranges of (clock, length)
    num_clients = data[pos]
    pos += 1
    if num_clients >= 0x80:
        num_clients, pos = _varuint_tail(data, pos, num_clients)
    if num_clients * 2 > n_data - pos:
        raise InvalidUpdate(_COUNT)
    for _ in range(num_clients):
        _client, pos = _read_varuint(data, pos)
        num_ranges, pos = _read_varuint(data, pos)
        if num_ranges * 2 > n_data - pos:
            raise InvalidUpdate(_COUNT)
        for _ in range(num_ranges):
            clock = data[pos]
            pos += 1
            if clock >= 0x80:
                clock, pos = _varuint_tail(data, pos, clock)
            length = data[pos]
            pos += 1
            if length >= 0x80:
                length, pos = _varuint_tail(data, pos, length)
            if clock + length > MAX_CLOCK:
                raise InvalidUpdate(_CLOCK_RANGE)
            if not length:
                raise InvalidUpdate("empty delete range")

    if pos != n_data:
        raise InvalidUpdate("trailing bytes after the update")


try:
    from collab import _fastscan
except ImportError:  # not built (it is optional): the Python scan does the same, slower
    _native_scan = None
else:
    _fastscan.init(invalid_update=InvalidUpdate, check_json=_check_json)
    _native_scan = _fastscan.scan

NATIVE_SCAN: bool = _native_scan is not None
"""True when validate_update uses the C scan of collab._fastscan."""


def validate_update(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """Check that `data` is one well-formed Yjs v1 update within the limits above.

    Returns None or raises InvalidUpdate; never anything else, for any bytes-like input.
    """
    if type(data) is not bytes:
        data = bytes(data)
    try:
        try:
            if _native_scan is None or type(max_depth) is not int:
                _scan_update(data, max_depth, None)
            elif _native_scan(data, max_depth):  # True: more type items than max_depth
                raise _NeedGraph
        except _NeedGraph:
            # Only an update with more type items than max_depth can nest them too deeply.
            # Such updates (rich documents) are scanned again, recording their structs.
            graph = _TypeGraph()
            _scan_update(data, max_depth, graph)
            graph.check(max_depth)
    except IndexError:
        raise InvalidUpdate("truncated") from None


def validate_state_vector(data: bytes) -> None:
    """Check that `data` is one well-formed state vector: varUint n, n x (client, clock)."""
    if type(data) is not bytes:
        data = bytes(data)
    try:
        count, pos = _read_varuint(data, 0)
        _plausible(count, data, pos, 2)
        for _ in range(count):
            _client, pos = _read_varuint(data, pos)
            clock, pos = _read_varuint(data, pos)
            if clock > MAX_CLOCK:
                raise InvalidUpdate("clock out of range")
    except IndexError:
        raise InvalidUpdate("truncated") from None
    if pos != len(data):
        raise InvalidUpdate("trailing bytes after the state vector")
