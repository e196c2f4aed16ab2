"""Stamping: every awareness state the server stores or relays carries the server's ``user``.

A client's state is kept as sent except ``user``, which is replaced by the identity of the
connection that owns the clientID: ``{id, name, color, colorLight, role}`` plus ``readOnly: true``
for viewers. ``user.color`` (and ``user.colorLight``) sent by the client are kept when they are
plain CSS hex colours, otherwise the colour is derived from the user id, so every node and every
client agrees on it. ``name``/``color`` is what y-codemirror and y-prosemirror draw cursors with.

States that are not JSON objects, or that use ``NaN``/``Infinity`` (Python accepts them, a
browser's ``JSON.parse`` throws on them and would drop the whole awareness message), are refused.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import json
import re
from typing import Any

_HEX6 = re.compile(r"#[0-9a-fA-F]{6}")
_HEX3 = re.compile(r"#[0-9a-fA-F]{3}")
_HEX8 = re.compile(r"#[0-9a-fA-F]{8}")


class InvalidState(ValueError):
    """An awareness state the server will not relay."""


@functools.lru_cache(maxsize=8192)
def color_for(user_id: str) -> str:
    """A stable, readable colour for ``user_id`` (same on every node, every restart)."""
    digest = hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).digest()
    hue = int.from_bytes(digest[:2], "big") % 360 / 360.0
    lightness = 0.42 + (digest[2] % 10) / 100.0
    r, g, b = colorsys.hls_to_rgb(hue, lightness, 0.7)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def css_color(value: Any) -> str | None:
    """``value`` as ``#rrggbb`` if it is a hex colour (#rgb or #rrggbb), else None."""
    if not isinstance(value, str):
        return None
    if _HEX6.fullmatch(value):
        return value.lower()
    if _HEX3.fullmatch(value):
        return "#" + "".join(ch * 2 for ch in value[1:].lower())
    return None


def _light(value: Any) -> str | None:
    if isinstance(value, str) and (_HEX8.fullmatch(value) or _HEX6.fullmatch(value)):
        return value.lower()
    return None


def _reject_constant(name: str) -> Any:
    raise InvalidState(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
# ensure_ascii keeps lone surrogates escaped, so the text always encodes as UTF-8.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def parse_state(raw: str) -> dict[str, Any]:
    try:
        value = _DECODER.decode(raw)
    except (ValueError, RecursionError):
        raise InvalidState("not JSON") from None
    if not isinstance(value, dict):
        raise InvalidState("awareness state must be a JSON object")
    return value


def user_stamp(user_id: str, name: str, role: str, client_user: Any = None) -> dict[str, Any]:
    color = css_color(client_user.get("color")) if isinstance(client_user, dict) else None
    color = color or color_for(user_id)
    light = _light(client_user.get("colorLight")) if isinstance(client_user, dict) else None
    stamp: dict[str, Any] = {"id": user_id, "name": name, "color": color, "colorLight": light or color + "33",
                             "role": role}
    if role != "editor":
        stamp["readOnly"] = True
    return stamp


def stamp_state(raw: str, user_id: str, name: str, role: str) -> tuple[str, dict[str, Any]]:
    """The state to store and relay, and the parsed object (for cursors). InvalidState if refused."""
    value = parse_state(raw)
    value["user"] = user_stamp(user_id, name, role, value.get("user"))
    return _ENCODER.encode(value), value
