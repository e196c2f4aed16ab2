"""Fixtures shared by the storage tests: every contract test runs once per backend.

A backend is a URL; add ``postgresql`` here (a fresh database or schema per test) and the whole
contract suite runs against it too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from storage import Store, open_store

BACKENDS = ["sqlite"]

OpenStore = Callable[..., Awaitable[Store]]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/data/collab.db"
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
