"""Every byte that reaches disk: Yjs update log, snapshots, history and metadata per room.

``open_store(url)`` picks the backend; callers see only ``Store`` (see ``storage.base``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from .base import (
    DEFAULT_HISTORY_KEEP,
    MAX_AUTHOR_BYTES,
    MAX_HISTORY_LIMIT,
    MAX_META_KEY_BYTES,
    MAX_META_KEYS,
    MAX_META_VALUE_BYTES,
    MAX_ROOM_NAME_BYTES,
    MAX_UPDATE_BYTES,
    RoomState,
    Store,
    StoreClosed,
    StoredUpdate,
    StoreError,
    fold_updates,
)
from .chat import ChatMention, ChatMessage
from .postgres import PostgresStore
from .sqlite import SQLiteStore

__all__ = [
    "ChatMention",
    "ChatMessage",
    "DEFAULT_HISTORY_KEEP",
    "MAX_AUTHOR_BYTES",
    "MAX_HISTORY_LIMIT",
    "MAX_META_KEYS",
    "MAX_META_KEY_BYTES",
    "MAX_META_VALUE_BYTES",
    "MAX_ROOM_NAME_BYTES",
    "MAX_UPDATE_BYTES",
    "PostgresStore",
    "RoomState",
    "SQLiteStore",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoredUpdate",
    "fold_updates",
    "is_postgres_url",
    "open_store",
]

# Options a sqlite URL may carry in its query string (?synchronous=NORMAL&busy_timeout=2).
_SQLITE_URL_OPTIONS: dict[str, type] = {
    "synchronous": str,
    "busy_timeout": float,
    "max_pending": int,
    "max_pending_bytes": int,
    "history_keep": int,
    "commit_interval": float,
    "writer": str,
}
# Options of ours a postgresql URL may carry; every other query parameter goes to asyncpg (sslmode,
# or any server setting such as ?statement_timeout=...).
_POSTGRES_URL_OPTIONS: dict[str, type] = {
    "schema": str,
    "pool_size": int,
    "command_timeout": float,
    "connect_timeout": float,
    "max_compactions": int,
    "max_pending": int,
    "max_pending_bytes": int,
    "history_keep": int,
    "synchronous": str,
    "commit_interval": float,
}


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql:", "postgres:"))


def open_store(url: str, **options: Any) -> Store:
    """The store at ``url``, not yet opened: ``await store.open()`` or ``async with store``.

    ``url`` is a plain file path (``collab-data/collab.db``), ``sqlite:relative/path.db``,
    ``sqlite:///absolute/path.db`` or ``postgresql://user:password@host:port/db`` (also
    ``postgres://``). Options in the query string (``?history_keep=0``, ``?schema=collab``...) are
    overridden by keyword ``options``.
    """
    if is_postgres_url(url):
        parts = urlsplit(url)
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"{url!r}: use postgresql://user@host:port/db")
        merged = {}
        passed = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in _POSTGRES_URL_OPTIONS:
                merged[key] = _POSTGRES_URL_OPTIONS[key](value)
            else:
                passed.append((key, value))
        merged.update(options)
        dsn = urlunsplit(parts._replace(query=urlencode(passed)))
        return PostgresStore(dsn, **merged)
    if url.startswith("sqlite:"):
        parts = urlsplit(url)
        if parts.netloc:
            raise ValueError(
                f"{url!r}: use sqlite:relative/path.db or sqlite:///absolute/path.db"
            )
        merged: dict[str, Any] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
            if key not in _SQLITE_URL_OPTIONS:
                raise ValueError(f"{url!r}: unknown option {key!r}")
            merged[key] = _SQLITE_URL_OPTIONS[key](value)
        merged.update(options)
        path = unquote(parts.path)
        if not path:
            raise ValueError(f"{url!r} names no file")
        return SQLiteStore(path, **merged)
    if "://" in url:
        raise ValueError(f"unsupported store URL {url!r} (sqlite: or postgresql:)")
    if not url:
        raise ValueError("empty store path")
    return SQLiteStore(url, **options)
