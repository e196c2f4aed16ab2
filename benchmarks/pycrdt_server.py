"""pycrdt-websocket served the way its users run it, for side-by-side comparisons.

    python -m benchmarks.pycrdt_server --port 1235 --db ystore.db

uvicorn (defaults: uvloop, its default websocket implementation) serving pycrdt-websocket's
``ASGIServer`` around a ``WebsocketServer`` whose rooms each persist to a pycrdt-store
``SQLiteYStore`` (one table for all rooms, the store's defaults: a checkpoint every 100 updates).
pycrdt-websocket does not load a room's stored updates by itself; like jupyter-collaboration we
override ``get_room`` to create the room with its store, apply what the store holds, then mark it
ready — once per room, concurrent joiners wait for that load. Rooms are dropped when their last
client leaves (``auto_clean_rooms``, the default), so the next join is a cold load from SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import anyio
import uvicorn
from pycrdt.store import SQLiteYStore, YDocNotFound
from pycrdt.websocket import ASGIServer, WebsocketServer, YRoom, exception_logger


def store_class(db_path: str) -> type[SQLiteYStore]:
    return type("BenchSQLiteYStore", (SQLiteYStore,), {"db_path": db_path})


class StoredWebsocketServer(WebsocketServer):
    def __init__(self, db_path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.store_cls = store_class(db_path)
        self._loaded: dict[str, anyio.Event] = {}

    async def get_room(self, name: str) -> YRoom:
        if name not in self.rooms:
            ystore = self.store_cls(path=name, log=self.log)
            room = YRoom(ready=False, ystore=ystore, exception_handler=exception_logger, log=self.log)
            self.rooms[name] = room
            loaded = self._loaded[name] = anyio.Event()
            try:
                await self.start_room(room)  # starts the room's store too
                await ystore.started.wait()
                try:
                    await ystore.apply_updates(room.ydoc)
                except YDocNotFound:
                    pass
                room.ready = True
            finally:
                loaded.set()
                self._loaded.pop(name, None)
        else:
            loaded = self._loaded.get(name)
            if loaded is not None:
                await loaded.wait()
        room = self.rooms[name]
        await self.start_room(room)
        return room


async def init_db(db_path: str) -> None:
    """Create the schema once up front (concurrent first writes of many rooms race on it)."""
    store = store_class(db_path)(path="__init__")
    async with store:
        await store.db_initialized.wait()


async def main(port: int, db_path: str, host: str = "127.0.0.1") -> None:
    logging.basicConfig(level=logging.WARNING)
    log = logging.getLogger("pycrdt_websocket")
    await init_db(db_path)
    websocket_server = StoredWebsocketServer(db_path, exception_handler=exception_logger, log=log)
    app = ASGIServer(websocket_server)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    async with websocket_server:
        await server.serve()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=1235)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--db", default="ystore.db")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(args.port, args.db, args.host))
    else:
        uvloop.run(main(args.port, args.db, args.host))
