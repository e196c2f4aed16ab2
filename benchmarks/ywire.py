"""Just enough of the Yjs / y-websocket wire format to generate load without a CRDT library.

The load generator must not be the bottleneck, so it never runs pycrdt per message:

* ``TextAppender`` writes the bytes of a Yjs v1 update that appends a string to a shared
  ``Y.Text`` after the sender's own previous insert — exactly what Yjs / yrs would encode for that
  edit (``tests/benchmarks`` checks the bytes against pycrdt). Each sender works only on its own
  items, so every update can be applied by any server whatever it has seen from other senders.
* ``update_id`` reads the (client, clock) of the first struct of a relayed update in a handful of
  varint reads. Servers that re-encode the update they relay (the Node reference server and
  pycrdt-websocket re-encode from the document transaction) still start the struct section with
  the same client and clock, so ``(client, clock)`` identifies a relayed insert on every server.
"""

from __future__ import annotations

MSG_SYNC = 0
MSG_AWARENESS = 1
SYNC_STEP1 = 0
SYNC_STEP2 = 1
SYNC_UPDATE = 2

# Step1 of an empty document (state vector = no clients) and Step2 with an empty update.
STEP1_EMPTY = b"\x00\x00\x01\x00"
STEP2_EMPTY = b"\x00\x01\x02\x00\x00"

_CONTENT_STRING = 4
_HAS_ORIGIN = 0x80


def var_uint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def read_var_uint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def var_bytes(data: bytes) -> bytes:
    return var_uint(len(data)) + data


def var_string(text: str) -> bytes:
    return var_bytes(text.encode("utf-8"))


def sync_message(sub: int, payload: bytes) -> bytes:
    return bytes((MSG_SYNC, sub)) + var_bytes(payload)


def update_message(update: bytes) -> bytes:
    return sync_message(SYNC_UPDATE, update)


def step1_message(state_vector: bytes) -> bytes:
    return sync_message(SYNC_STEP1, state_vector)


class TextAppender:
    """Builds the updates of one client appending strings to the ``Y.Text`` named ``name``.

    ``clock`` is the client's next clock (the number of UTF-16 units it has inserted so far);
    ASCII text only, so characters, bytes and UTF-16 units agree.
    """

    def __init__(self, client_id: int, name: str = "text", clock: int = 0) -> None:
        self.client_id = client_id
        self.clock = clock
        self._client = var_uint(client_id)
        self._parent = b"\x01" + var_string(name)  # parent info: a root type named `name`

    def append(self, text: str) -> tuple[bytes, int]:
        """Return ``(update, clock)`` for appending ``text``; ``clock`` identifies the insert."""
        if not text or not text.isascii():
            raise ValueError("ASCII, non-empty text only")
        clock = self.clock
        head = b"\x01\x01" + self._client + var_uint(clock)
        if clock == 0:
            item = bytes((_CONTENT_STRING,)) + self._parent
        else:
            item = bytes((_CONTENT_STRING | _HAS_ORIGIN,)) + self._client + var_uint(clock - 1)
        self.clock = clock + len(text)
        return head + item + var_string(text) + b"\x00", clock


def update_id(update: bytes, pos: int = 0) -> tuple[int, int] | None:
    """(client, clock) of the first struct in a v1 update starting at ``pos``; None if it has none."""
    groups, pos = read_var_uint(update, pos)
    if groups == 0:
        return None
    _structs, pos = read_var_uint(update, pos)
    client, pos = read_var_uint(update, pos)
    clock, pos = read_var_uint(update, pos)
    return client, clock


def relayed_update_id(message: bytes) -> tuple[int, int] | None:
    """For a y-websocket ``sync update`` (or step2) message, the id of its first struct."""
    if len(message) < 4 or message[0] != MSG_SYNC or message[1] == SYNC_STEP1:
        return None
    _length, pos = read_var_uint(message, 2)
    return update_id(message, pos)


def sync_payload(message: bytes) -> tuple[int, bytes] | None:
    """``(sub_type, payload)`` of a sync message, or None for other message types."""
    if len(message) < 3 or message[0] != MSG_SYNC:
        return None
    length, pos = read_var_uint(message, 2)
    return message[1], message[pos:pos + length]
