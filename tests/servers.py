"""Start real `collab serve` processes for end-to-end tests (so they can be SIGKILLed/SIGTERMed)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx

from yjs import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
SECRET = "test-secret-0123456789abcdef-0123"  # the signing secret tests pass to --secret


class ServerProcess:
    def __init__(self, data_dir: Path, *, port: int | None = None, store: str | None = None,
                 **settings: Any) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.store = store or str(self.data_dir / "collab.db")
        self.settings = settings
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = self.data_dir / f"server-{self.port}.log"
        self._log_file = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        args = [sys.executable, "-m", "collab", "serve", "--port", str(self.port), "--store", self.store,
                "--log-format", "json", "--log-level", "debug"]
        for key, value in self.settings.items():
            if value is not None:
                args += ["--" + key.replace("_", "-"), str(value)]
        return args

    async def start(self, timeout: float = 20.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        env = {k: v for k, v in os.environ.items() if not k.startswith("COLLAB_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv(), cwd=str(self.data_dir), stdout=self._log_file, stderr=self._log_file, env=env)
        async with httpx.AsyncClient() as client:
            async def healthy() -> bool:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
                try:
                    return (await client.get(self.http + "/healthz", timeout=1)).status_code == 200
                except httpx.HTTPError:
                    return False

            try:
                await wait_until(healthy, timeout=timeout, interval=0.05, what="server start")
            except TimeoutError:
                raise TimeoutError(f"server did not start:\n{self.logs()[-3000:]}") from None
        return self

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._log_file:
            self._log_file.close()
        return self.proc.returncode

    async def kill(self) -> None:
        await self.stop(signal.SIGKILL)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.logs().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append({"event": line, "unparsed": True})
        return records

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient() as client:
            return await client.get(self.http + path, timeout=5)

    async def metric(self, name: str, labels: str = "") -> float:
        text = (await self.get("/metrics")).text
        total = 0.0
        found = False
        for line in text.splitlines():
            if line.startswith(name + (labels if labels else "")) and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                if key == name + labels or (not labels and key.split("{")[0] == name):
                    total += float(value)
                    found = True
        if not found:
            return 0.0
        return total


class InProcessServer:
    """A real uvicorn server running `create_app` inside the test's event loop.

    Cheaper than a process, and lets several nodes share one in-process bus network
    (`collab.bus.LocalNetwork`) to exercise multi-node paths without Redis.
    """

    def __init__(self, data_dir: Path, *, network=None, store=None, clock=None, services=None,
                 **settings: Any) -> None:
        """``clock``: the hub's clock (a fake one makes timeout tests instant); ``services``: replaces
        the default services (e.g. a PresenceService with test settings)."""
        from collab.settings import load_settings

        self.port = settings.pop("port", None) or free_port()
        flags = {"port": str(self.port), "store": str(Path(data_dir) / "collab.db")}
        flags.update({k: str(v) for k, v in settings.items() if v is not None})
        self.settings = load_settings(flags, environ={})
        self.network = network
        self._store = store
        self._clock = clock
        self._services = services
        self.app = None
        self._server = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hub(self):
        return self.app.state.hub

    async def start(self) -> InProcessServer:
        import uvicorn

        from collab.app import create_app
        from collab.wsfast import uvicorn_ws

        extra = {"clock": self._clock} if self._clock is not None else {}
        self.app = create_app(self.settings, network=self.network, store=self._store, services=self._services, **extra)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, ws=uvicorn_ws(self.settings.ws_impl),
                                lifespan="on", log_config=None, access_log=False, ws_per_message_deflate=False,
                                ws_max_size=self.settings.max_frame_bytes + 65536)
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._task = asyncio.create_task(self._server.serve())
        await wait_until(lambda: self._server.started or self._task.done(), timeout=10, what="in-process server")
        if self._task.done():
            self._task.result()
        return self

    async def stop(self) -> None:
        if self._server is not None and self._task is not None and not self._task.done():
            self._server.should_exit = True
            await asyncio.wait_for(self._task, 20)

    async def __aenter__(self) -> InProcessServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class RedisServer:
    """A private `redis-server` on a free loopback port, so tests can kill, freeze and restart it."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> RedisServer:
        import shutil

        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (make test installs it)"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.data_dir), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await wait_until(self._accepting, timeout=10, what="redis-server to accept connections")
        return self

    async def _accepting(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.write(b"PING\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 2)
        writer.close()
        return line.startswith(b"+PONG")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            await self.proc.wait()

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    async def __aenter__(self) -> RedisServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class TcpBalancer:
    """The simplest load balancer: each new TCP connection goes to the first upstream that accepts.

    Kill a node and its clients' reconnects land on the next one — no sticky routing involved.
    """

    def __init__(self, upstream_ports: list[int]) -> None:
        self.upstreams = list(upstream_ports)
        self.port = free_port()
        self._server: asyncio.base_events.Server | None = None
        self._pipes: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> TcpBalancer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for port in self.upstreams:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                continue
        else:
            writer.close()
            return
        for task in (asyncio.create_task(_pipe(reader, up_writer)), asyncio.create_task(_pipe(up_reader, writer))):
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def __aenter__(self) -> TcpBalancer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.CancelledError):
        pass
    finally:
        writer.close()
