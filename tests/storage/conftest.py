"""Fixtures shared by the storage tests: every contract test runs once per backend.

A backend is a URL. ``sqlite``: a fresh file per test. ``postgres``: one fresh database per session
(``collab_test_<random>``, dropped at the end) and a fresh schema per test (``?schema=t_<random>``),
on the server named by ``COLLAB_TEST_POSTGRES`` (default: the local one, trust auth). If PostgreSQL
is not reachable the postgres tests fail -- they never skip: a backend nobody tests is broken.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from storage import Store, open_store

BACKENDS = ["sqlite", "postgres"]
POSTGRES_ADMIN_URL = os.environ.get(
    "COLLAB_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
HOW_TO_START = (
    "start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` "
    "(check with `pg_isready -h 127.0.0.1`), or point COLLAB_TEST_POSTGRES at a server"
)

OpenStore = Callable[..., Awaitable[Store]]


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}", query=""))


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_db() -> Iterator[str]:
    """URL of a database created for this session (as user postgres); dropped afterwards."""
    name = f"collab_test_{secrets.token_hex(4)}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({exc!r}): {HOW_TO_START}",
            pytrace=False,
        )
    try:
        yield with_database(POSTGRES_ADMIN_URL, name)
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def postgres_url(postgres_db: str) -> str:
    """A store URL with a schema of its own: a clean store for one test."""
    return f"{postgres_db}?schema=t_{secrets.token_hex(6)}"


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/data/collab.db"
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    raise AssertionError(request.param)


@pytest.fixture
async def open_new(store_url: str) -> AsyncIterator[OpenStore]:
    """Opens another Store on the same storage (a second server process, or a restart)."""
    opened: list[Store] = []

    async def factory(**options: Any) -> Store:
        store = open_store(store_url, **options)
        await store.open()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_new: OpenStore) -> Store:
    return await open_new()
