from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg

import pytest

from servers import SECRET, ServerProcess  # noqa: F401 - SECRET re-exported for fixtures
from yjs import NodeYjs, ensure_node_modules

POSTGRES_ADMIN_URL = os.environ.get(
    "COLLAB_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
HOW_TO_START = (
    "start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` "
    "(check with `pg_isready -h 127.0.0.1`), or point COLLAB_TEST_POSTGRES at a server"
)



@pytest.fixture(scope="session", autouse=True)
def _node_modules() -> None:
    ensure_node_modules()


@pytest.fixture
async def server_factory(tmp_path):
    started: list[ServerProcess] = []

    async def start(**settings) -> ServerProcess:
        data = settings.pop("data_dir", tmp_path)
        srv = ServerProcess(data, **settings)
        await srv.start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        await srv.stop()


@pytest.fixture
async def server(server_factory) -> ServerProcess:
    return await server_factory()


@pytest.fixture
async def node():
    async with NodeYjs() as n:
        yield n


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
