"""Chat history beside the documents: the rows, their bounds and the argument checks.

Theory of operation
-------------------
Chat lives in the same store as the documents (same file / database, same backups), in tables of
its own -- never inside a CRDT document. Every backend implements the ``chat_*`` methods of
``Store``; this module holds what they share.

* A message's id is chosen by the server (sortable, unique across nodes without coordination, see
  ``collab.chat.MessageIds``); the store only requires it to be unique. History is ordered by id,
  and ``before`` pages through it (exclusive), newest first, returned oldest first.
* Each write (add, edit, delete, react, read marks, known users) is one durable transaction of
  its own, independent of the update log's group commit.
* Deleting a message keeps a *tombstone*: id, author, time and ``reply_to`` stay, the text, anchor,
  mentions and reactions are removed from storage, ``deleted`` is set.
* Mentions are rows (user, room, message, read) so that a user's unread mentions across every room
  are one index range. ``anchor`` is opaque JSON text to the store (the server resolves it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import MAX_AUTHOR_BYTES, _check_text, check_room

# Ids are short server-made strings (26 chars today); bounded so a forged cursor cannot be huge.
MAX_CHAT_ID_BYTES = 64
# A hard ceiling for one message's text; the server's own limit (``chat_max_chars``) is far lower.
MAX_CHAT_TEXT_BYTES = 256 * 1024
MAX_CHAT_ANCHOR_BYTES = 16 * 1024
MAX_CHAT_NAME_BYTES = 1024
MAX_CHAT_EMOJI_BYTES = 64
MAX_CHAT_MENTIONS = 50  # users one message may mention
MAX_CHAT_REACTIONS = 64  # distinct emoji on one message
MAX_CHAT_LIMIT = 1000  # one history / mentions page
MAX_CHAT_PUT_USERS = 10_000  # known users one ``chat_put_users`` call may write


@dataclass(frozen=True)
class ChatMessage:
    id: str
    room: str
    author: str  # user id, from the token
    author_name: str
    text: str
    ts: float
    reply_to: str | None = None
    anchor: str | None = None  # JSON text (a Yjs relative-position range), opaque to the store
    mentions: tuple[str, ...] = ()
    reactions: dict[str, tuple[str, ...]] = field(default_factory=dict)  # emoji -> user ids
    edited_ts: float | None = None
    deleted: bool = False


@dataclass(frozen=True)
class ChatMention:
    user: str
    read: bool
    message: ChatMessage


def check_chat_id(what: str, value: str) -> None:
    _check_text(what, value, MAX_CHAT_ID_BYTES)


def check_chat_message(message: ChatMessage) -> None:
    check_room(message.room)
    check_chat_id("message id", message.id)
    _check_text("author", message.author, MAX_AUTHOR_BYTES)
    _check_text("author name", message.author_name, MAX_CHAT_NAME_BYTES)
    check_chat_text(message.text)
    if message.reply_to is not None:
        check_chat_id("reply_to", message.reply_to)
    if message.anchor is not None:
        _check_text("anchor", message.anchor, MAX_CHAT_ANCHOR_BYTES)
    check_mentions(message.mentions)


def check_chat_text(text: str) -> None:
    _check_text("chat text", text, MAX_CHAT_TEXT_BYTES)


def check_mentions(mentions: tuple[str, ...] | list[str]) -> None:
    if len(mentions) > MAX_CHAT_MENTIONS:
        raise ValueError(f"more than {MAX_CHAT_MENTIONS} mentions")
    for user in mentions:
        _check_text("mentioned user", user, MAX_AUTHOR_BYTES)


def check_emoji(emoji: str) -> None:
    _check_text("emoji", emoji, MAX_CHAT_EMOJI_BYTES)


def check_limit(limit: int) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise TypeError(f"limit must be int, not {type(limit).__name__}")
    if not 1 <= limit <= MAX_CHAT_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_CHAT_LIMIT}")


def check_user(user: str, name: str | None = None) -> None:
    _check_text("user id", user, MAX_AUTHOR_BYTES)
    if name is not None:
        _check_text("user name", name, MAX_CHAT_NAME_BYTES)


def checked_users(users: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, str, float]]:
    """``chat_put_users``'s entries checked, as rows (room, user id, name, last seen now)."""
    if len(users) > MAX_CHAT_PUT_USERS:
        raise ValueError(f"at most {MAX_CHAT_PUT_USERS} users per call, not {len(users)}")
    now = time.time()
    rows = []
    for room, user, name in users:
        check_room(room)
        check_user(user, name)
        rows.append((room, user, name, now))
    return rows


def toggle_reaction(reactions: dict[str, tuple[str, ...]], emoji: str, user: str) -> dict[str, tuple[str, ...]]:
    """``user``'s reaction ``emoji`` added if absent, removed if present (empty emoji vanish)."""
    out = dict(reactions)
    users = out.get(emoji, ())
    if user in users:
        remaining = tuple(u for u in users if u != user)
        if remaining:
            out[emoji] = remaining
        else:
            out.pop(emoji, None)
    else:
        if emoji not in out and len(out) >= MAX_CHAT_REACTIONS:
            raise ValueError(f"a message holds at most {MAX_CHAT_REACTIONS} distinct reactions")
        out[emoji] = (*users, user)
    return out


# -- rows <-> messages (both backends store mentions and reactions as JSON text) ----------------

COLUMNS = "id, room, author, author_name, text, ts, reply_to, anchor, mentions, reactions, edited_ts, deleted"


def to_row(message: ChatMessage) -> tuple[Any, ...]:
    return (message.id, message.room, message.author, message.author_name, message.text, message.ts,
            message.reply_to, message.anchor, dump_mentions(message.mentions),
            dump_reactions(message.reactions), message.edited_ts, bool(message.deleted))


def from_row(row: Any) -> ChatMessage:
    (id_, room, author, author_name, text, ts, reply_to, anchor, mentions, reactions, edited_ts,
     deleted) = tuple(row)
    return ChatMessage(
        id=str(id_), room=str(room), author=str(author), author_name=str(author_name), text=str(text),
        ts=float(ts), reply_to=reply_to, anchor=anchor, mentions=tuple(json.loads(mentions or "[]")),
        reactions=load_reactions(reactions), edited_ts=None if edited_ts is None else float(edited_ts),
        deleted=bool(deleted),
    )


def dump_mentions(mentions: tuple[str, ...] | list[str]) -> str:
    return json.dumps(list(mentions), ensure_ascii=False)


def dump_reactions(reactions: dict[str, tuple[str, ...]]) -> str:
    return json.dumps({emoji: list(users) for emoji, users in reactions.items()}, ensure_ascii=False)


def load_reactions(raw: str | None) -> dict[str, tuple[str, ...]]:
    return {emoji: tuple(users) for emoji, users in json.loads(raw or "{}").items()}
