"""A tiny lib0 encoder for hand-made (and hostile) Yjs update frames, shared by the tests."""

from __future__ import annotations


def vu(n: int) -> bytes:
    """varUint (unsigned LEB128)."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def vs(s: str | bytes) -> bytes:
    """varString / varUint8Array."""
    raw = s.encode() if isinstance(s, str) else s
    return vu(len(raw)) + raw


def update(client: int, clock: int, structs: list[bytes], ds: bytes = b"\x00") -> bytes:
    """One client section holding `structs`, then a delete set."""
    return vu(1) + vu(len(structs)) + vu(client) + vu(clock) + b"".join(structs) + ds


def root_item(content_ref: int, content: bytes, name: str | bytes = "t", key: str | None = None) -> bytes:
    """An Item without origins whose parent is the root type `name` (optionally a map key)."""
    info = content_ref | (0x20 if key is not None else 0)
    return bytes([info]) + vu(1) + vs(name) + (vs(key) if key is not None else b"") + content


def child_item(content_ref: int, content: bytes, parent: tuple[int, int], key: str) -> bytes:
    """An Item without origins whose parent is the type item with id `parent`, under `key`."""
    return bytes([content_ref | 0x20]) + vu(0) + vu(parent[0]) + vu(parent[1]) + vs(key) + content


def nested_any_arrays(depth: int) -> bytes:
    """A lib0 Any value: `depth` arrays, each holding the next, the innermost holding null."""
    return b"\x75\x01" * depth + b"\x7e"


def nested_maps_update(depth: int, client: int = 5) -> bytes:
    """`depth` Y.Maps, each set under key "k" of the previous one; the first in root map "m"."""
    structs = [root_item(7, vu(1), name="m", key="k")]
    structs += [child_item(7, vu(1), (client, i - 1), "k") for i in range(1, depth)]
    return update(client, 0, structs)
