"""Start real `collab serve` processes for end-to-end tests (so they can be SIGKILLed/SIGTERMed)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from yjs import free_port

ROOT = Path(__file__).resolve().parents[1]


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
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as client:
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
                try:
                    r = await client.get(self.http + "/healthz", timeout=1)
                    if r.status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server did not start:\n{self.logs()[-3000:]}")
                await asyncio.sleep(0.05)

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


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll a sync or async predicate until truthy; return its value or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)
