"""Fixtures shared by the storage tests: every contract test runs once per backend.

(The PostgreSQL database fixtures live in tests/conftest.py: the scale-out tests use them too.)

A backend is a URL. ``sqlite``: a fresh file per test. ``postgres``: one fresh database per session
(``collab_test_<random>``, dropped at the end) and a fresh schema per test (``?schema=t_<random>``),
on the server named by ``COLLAB_TEST_POSTGRES`` (default: the local one, trust auth). If PostgreSQL
is not reachable the postgres tests fail -- they never skip: a backend nobody tests is broken.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from storage import Store, open_store

# sqlite-process: the SQLite store with its group commits in a child process (the server's default).
BACKENDS = ["sqlite", "sqlite-process", "postgres"]
OpenStore = Callable[..., Awaitable[Store]]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/data/collab.db"
    if request.param == "sqlite-process":
        return f"sqlite://{tmp_path}/data/collab.db?writer=process"
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
