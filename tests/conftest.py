from __future__ import annotations

import pytest

from servers import ServerProcess
from yjs import NodeYjs, ensure_node_modules

SECRET = "test-secret-0123456789abcdef"


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
