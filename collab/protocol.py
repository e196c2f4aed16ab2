"""The y-websocket wire protocol, pure: bytes in, typed messages out, and back.

Theory of operation
-------------------
One binary websocket message is one y-protocols message: ``varUint(type) · payload``.
``decode`` validates everything a hostile client controls *before* any CRDT code sees it:

* the frame size (``Limits.max_frame_bytes``) — bounds memory per message;
* every varint is at most 8 bytes — a longer one is never legitimate and would let a client
  make decoders loop or build huge integers;
* every declared length fits in the bytes that remain — a 5-byte frame cannot announce 2 GiB;
* Yjs updates and state vectors are parsed structurally by :mod:`collab.updates`, including a
  nesting-depth limit (``Limits.max_depth``): pycrdt can overflow the native stack on deeply
  nested content and take the whole process down;
* awareness updates: bounded entry count, bounded JSON size and depth per state.

Any violation raises :class:`ProtocolError` carrying the close code and a short reason that is
safe to show the client. Nothing here does I/O or knows about rooms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from collab.closecodes import BAD_MESSAGE, TOO_LARGE
from collab.updates import InvalidUpdate, json_depth, validate_state_vector, validate_update

MSG_SYNC: Final = 0
MSG_AWARENESS: Final = 1
MSG_AUTH: Final = 2
MSG_QUERY_AWARENESS: Final = 3
# Our extension messages (undo/redo, chat, …) on the document socket: varUint8Array(JSON object
# with a string "type"). 101 is far above every type y-protocols (0–3) or Hocuspocus (0–10) uses;
# stock y-websocket clients that don't know it log and ignore it.
MSG_EXTENSION: Final = 101

SYNC_STEP1: Final = 0
SYNC_STEP2: Final = 1
SYNC_UPDATE: Final = 2

AUTH_PERMISSION_DENIED: Final = 0

MAX_VARINT_BYTES: Final = 8

# Sent as keepalive: an awareness update with zero entries. Stock clients apply it as a no-op but
# it counts as "a message arrived" for their 30 s reconnect watchdog (websocket pings do not).
KEEPALIVE_FRAME: Final = b"\x01\x01\x00"


class ProtocolError(Exception):
    """Bad input from a client. ``code`` is the websocket close code, ``reason`` is client-safe."""

    def __init__(self, reason: str, code: int = BAD_MESSAGE) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame_bytes: int = 16 * 1024 * 1024
    max_depth: int = 64
    max_awareness_entries: int = 64
    max_awareness_state_bytes: int = 64 * 1024
    max_extension_bytes: int = 256 * 1024


@dataclass(frozen=True, slots=True)
class SyncStep1:
    state_vector: bytes


@dataclass(frozen=True, slots=True)
class SyncStep2:
    update: bytes


@dataclass(frozen=True, slots=True)
class SyncUpdate:
    update: bytes


@dataclass(frozen=True, slots=True)
class AwarenessEntry:
    client_id: int
    clock: int
    state: str  # JSON text; "null" means removal


@dataclass(frozen=True, slots=True)
class AwarenessUpdate:
    entries: tuple[AwarenessEntry, ...]


@dataclass(frozen=True, slots=True)
class QueryAwareness:
    pass


@dataclass(frozen=True, slots=True)
class AuthMessage:
    payload: bytes


@dataclass(frozen=True, slots=True)
class ExtensionMessage:
    body: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.body["type"])


Message = SyncStep1 | SyncStep2 | SyncUpdate | AwarenessUpdate | QueryAwareness | AuthMessage | ExtensionMessage


# -- lib0 varints ------------------------------------------------------------------------------


def write_var_uint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)


def var_uint(value: int) -> bytes:
    out = bytearray()
    write_var_uint(out, value)
    return bytes(out)


def read_var_uint(data: bytes, pos: int) -> tuple[int, int]:
    """Return ``(value, new_pos)``; raise ProtocolError on truncation or an over-long varint."""
    value = 0
    shift = 0
    end = len(data)
    for i in range(MAX_VARINT_BYTES):
        if pos >= end:
            raise ProtocolError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ProtocolError("varint too long")


def read_var_bytes(data: bytes, pos: int) -> tuple[bytes, int]:
    length, pos = read_var_uint(data, pos)
    end = pos + length
    if end > len(data):
        raise ProtocolError("declared length exceeds frame")
    return data[pos:end], end


def read_var_string(data: bytes, pos: int) -> tuple[str, int]:
    raw, pos = read_var_bytes(data, pos)
    try:
        return raw.decode("utf-8"), pos
    except UnicodeDecodeError:
        raise ProtocolError("invalid UTF-8") from None


def write_var_bytes(out: bytearray, value: bytes) -> None:
    write_var_uint(out, len(value))
    out += value


def write_var_string(out: bytearray, value: str) -> None:
    # lib0 counts UTF-8 bytes (pycrdt's Encoder counts characters: wrong for non-ASCII).
    write_var_bytes(out, value.encode("utf-8"))


# -- decoding ----------------------------------------------------------------------------------


def decode(frame: bytes, limits: Limits = Limits()) -> Message:
    size = len(frame)
    if size > limits.max_frame_bytes:
        raise ProtocolError("frame too large", TOO_LARGE)
    if size > 3 and frame[0] == MSG_SYNC and frame[1] <= SYNC_UPDATE and frame[2] == size - 3 < 0x80:
        # Nearly all traffic: a sync message under 128 bytes, its one-byte length exactly filling
        # the frame, needs no varint readers. Every other shape, errors included, goes below.
        return _sync_message(frame[1], frame[3:], limits)
    msg_type, pos = read_var_uint(frame, 0)
    if msg_type == MSG_SYNC:
        sub, pos = read_var_uint(frame, pos)
        payload, pos = read_var_bytes(frame, pos)
        _expect_end(frame, pos)
        return _sync_message(sub, payload, limits)
    if msg_type == MSG_AWARENESS:
        payload, pos = read_var_bytes(frame, pos)
        _expect_end(frame, pos)
        return AwarenessUpdate(decode_awareness(payload, limits))
    if msg_type == MSG_QUERY_AWARENESS:
        _expect_end(frame, pos)
        return QueryAwareness()
    if msg_type == MSG_AUTH:
        return AuthMessage(frame[pos:])
    if msg_type == MSG_EXTENSION:
        payload, pos = read_var_bytes(frame, pos)
        _expect_end(frame, pos)
        return ExtensionMessage(decode_extension_body(payload, limits))
    raise ProtocolError("unknown message type")


def _sync_message(sub: int, payload: bytes, limits: Limits) -> Message:
    try:
        if sub == SYNC_UPDATE:
            validate_update(payload, max_depth=limits.max_depth)
            return SyncUpdate(payload)
        if sub == SYNC_STEP1:
            validate_state_vector(payload)
            return SyncStep1(payload)
        if sub == SYNC_STEP2:
            validate_update(payload, max_depth=limits.max_depth)
            return SyncStep2(payload)
    except InvalidUpdate as exc:
        raise ProtocolError(f"invalid update: {exc}") from None
    raise ProtocolError("unknown sync message")


def decode_awareness(payload: bytes, limits: Limits = Limits()) -> tuple[AwarenessEntry, ...]:
    count, pos = read_var_uint(payload, 0)
    if count > limits.max_awareness_entries:
        raise ProtocolError("too many awareness entries")
    entries = []
    for _ in range(count):
        client_id, pos = read_var_uint(payload, pos)
        clock, pos = read_var_uint(payload, pos)
        state, pos = read_var_string(payload, pos)
        if len(state) > limits.max_awareness_state_bytes:
            raise ProtocolError("awareness state too large", TOO_LARGE)
        if json_depth(state) > limits.max_depth:
            raise ProtocolError("awareness state nested too deep")
        try:
            json.loads(state)
        except (ValueError, RecursionError):
            raise ProtocolError("awareness state is not JSON") from None
        entries.append(AwarenessEntry(client_id, clock, state))
    _expect_end(payload, pos)
    return tuple(entries)


def decode_extension_body(payload: bytes, limits: Limits = Limits()) -> dict[str, Any]:
    if len(payload) > limits.max_extension_bytes:
        raise ProtocolError("extension message too large", TOO_LARGE)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("invalid UTF-8") from None
    if json_depth(text) > limits.max_depth:
        raise ProtocolError("extension message nested too deep")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("extension message is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("type"), str) or not body["type"]:
        raise ProtocolError("extension message needs a string 'type'")
    return body


def _expect_end(data: bytes, pos: int) -> None:
    if pos != len(data):
        raise ProtocolError("trailing bytes")


# -- encoding ----------------------------------------------------------------------------------


def _sync(sub: int, payload: bytes) -> bytes:
    out = bytearray((MSG_SYNC, sub))
    write_var_bytes(out, payload)
    return bytes(out)


def encode_sync_step1(state_vector: bytes) -> bytes:
    return _sync(SYNC_STEP1, state_vector)


def encode_sync_step2(update: bytes) -> bytes:
    return _sync(SYNC_STEP2, update)


def encode_update(update: bytes) -> bytes:
    n = len(update)
    if n < 0x80:  # most updates: a one-byte length
        return bytes((MSG_SYNC, SYNC_UPDATE, n)) + update
    return _sync(SYNC_UPDATE, update)


def encode_awareness(entries: list[AwarenessEntry] | tuple[AwarenessEntry, ...]) -> bytes:
    body = bytearray()
    write_var_uint(body, len(entries))
    for entry in entries:
        write_var_uint(body, entry.client_id)
        write_var_uint(body, entry.clock)
        write_var_string(body, entry.state)
    out = bytearray((MSG_AWARENESS,))
    write_var_bytes(out, bytes(body))
    return bytes(out)


def encode_extension(body: dict[str, Any]) -> bytes:
    out = bytearray()
    write_var_uint(out, MSG_EXTENSION)
    write_var_bytes(out, json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return bytes(out)


def encode_permission_denied(reason: str) -> bytes:
    out = bytearray((MSG_AUTH, AUTH_PERMISSION_DENIED))
    write_var_string(out, reason)
    return bytes(out)
