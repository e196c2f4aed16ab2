"""The servers a benchmark can start on loopback, each as its own process (so that its CPU and RSS
can be measured by pid, and so that it can be restarted for cold joins).

* ``collab``  — this project: ``python -m collab serve`` (SQLite store, durability on).
* ``node``    — the reference ``@y/websocket-server`` 0.1.1 (in-memory; no persistence).
* ``pycrdt``  — pycrdt-websocket 0.16 under uvicorn with a pycrdt-store ``SQLiteYStore`` per room
  (``benchmarks/pycrdt_server.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "tests" / "node"
NODE_SERVER = NODE_DIR / "node_modules" / "@y" / "websocket-server" / "src" / "server.js"

KINDS = ("collab", "node", "pycrdt")  # what a comparison runs by default
EXTRA_KINDS = ("collab-normal",)  # on request: our server with synchronous=NORMAL (crash-safe, not power-safe)
LABELS = {
    "collab": "collab (this server)",
    "collab-normal": "collab, SQLite synchronous=NORMAL",
    "node": "y-websocket-server 0.1.1 (Node)",
    "pycrdt": "pycrdt-websocket 0.16 + SQLiteYStore",
}

# Flags for our server in benchmarks: quiet logs, and room for the connections a benchmark opens.
# Rate limits stay at their defaults unless a benchmark says otherwise (replay raises them).
COLLAB_BENCH_FLAGS = {"log_level": "warning", "log_format": "json", "max_connections": 50_000}
COLLAB_UNLIMITED = {"rate_limit": 1e9, "rate_burst": 1_000_000_000}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_pressure() -> float | None:
    """Share of the last 10 s in which runnable tasks waited for a CPU (Linux PSI), in %: how much
    *other* load competed with the benchmark. None where PSI is not available."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(line.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def set_priority(nice: int | None) -> int:
    """Set this process's nice value (children — servers, generator workers — inherit it).
    Negative values need root. Returns the value in effect."""
    if nice is not None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except (PermissionError, OSError) as exc:
            print(f"warning: cannot set nice {nice}: {exc}", file=sys.stderr)
    return os.getpriority(os.PRIO_PROCESS, 0)


def raise_fd_limit(wanted: int = 200_000) -> int:
    """Raise this process's open-file limit (children inherit it); returns the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class BenchServer:
    """A server process on 127.0.0.1:port. ``start``/``stop`` may be repeated (same port, same data)."""

    kind = ""

    def __init__(self, data_dir: Path | None = None, port: int | None = None) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix=f"collab-bench-{self.kind}-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self._log = None
        self.starts = 0

    @property
    def label(self) -> str:
        return LABELS[self.kind]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"{self.kind}-server.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COLLAB_")}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def cwd(self) -> Path:
        return ROOT

    async def start(self, timeout: float = 30.0) -> BenchServer:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv(), cwd=str(self.cwd()), env=self.env(), stdout=self._log, stderr=self._log,
            stdin=asyncio.subprocess.DEVNULL)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.kind} server exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
            if await self._ready():
                return self
            if time.monotonic() > deadline:
                await self.stop(kill=True)
                raise TimeoutError(f"{self.kind} server did not start:\n{self.logs()[-3000:]}")
            await asyncio.sleep(0.05)

    async def _ready(self) -> bool:
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        w.close()
        with contextlib.suppress(Exception):
            await w.wait_closed()
        return True

    async def stop(self, kill: bool = False, timeout: float = 30.0) -> int | None:
        proc, self.proc = self.proc, None
        code = None
        if proc is not None:
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), timeout)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            code = proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    async def restart(self) -> BenchServer:
        await self.stop()
        return await self.start()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    async def __aenter__(self) -> BenchServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        self.cleanup()


class CollabServer(BenchServer):
    kind = "collab"

    def __init__(self, data_dir: Path | None = None, port: int | None = None, **flags: object) -> None:
        super().__init__(data_dir, port)
        self.flags = {**COLLAB_BENCH_FLAGS, **flags}

    def argv(self) -> list[str]:
        args = [sys.executable, "-m", "collab", "serve", "--port", str(self.port),
                "--store", str(self.data_dir / "collab.db")]
        for key, value in self.flags.items():
            if value is not None:
                args += ["--" + key.replace("_", "-"), _flag(value)]
        return args

    async def _ready(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            status = await asyncio.wait_for(reader.readline(), 2)
            return b" 200 " in status
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class NodeServer(BenchServer):
    kind = "node"

    def argv(self) -> list[str]:
        if not NODE_SERVER.exists():
            raise RuntimeError(f"{NODE_SERVER} is missing: run `make node-deps`")
        return ["node", str(NODE_SERVER)]

    def env(self) -> dict[str, str]:
        return {**super().env(), "HOST": "127.0.0.1", "PORT": str(self.port)}

    def cwd(self) -> Path:
        return NODE_DIR


class PycrdtServer(BenchServer):
    kind = "pycrdt"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "ystore.db"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "benchmarks.pycrdt_server", "--port", str(self.port),
                "--db", str(self.db_path)]


def make_server(kind: str, data_dir: Path | None = None, **flags: object) -> BenchServer:
    if kind == "collab":
        return CollabServer(data_dir, **flags)
    if kind == "collab-normal":
        server = CollabServer(data_dir, **{**flags, "sqlite_synchronous": "NORMAL"})
        server.kind = "collab-normal"
        return server
    if kind == "node":
        return NodeServer(data_dir)
    if kind == "pycrdt":
        return PycrdtServer(data_dir)
    raise ValueError(f"unknown server kind {kind!r} (choose from {', '.join(KINDS + EXTRA_KINDS)})")


def _flag(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class ProcSampler:
    """Samples a process's CPU (% of one core) and RSS every ``interval`` seconds, with those of
    its children (our SQLite writer process): what the server costs, whatever shape it has."""

    def __init__(self, pid: int | None, interval: float = 0.5) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float, int]] = []  # (monotonic, cpu %, rss bytes)
        self._task: asyncio.Task[None] | None = None
        self._proc = psutil.Process(pid) if pid else None

    def snapshot(self) -> tuple[float, int] | None:
        """(cumulative CPU seconds, RSS bytes) now, or None without a pid."""
        if self._proc is None:
            return None
        try:
            with self._proc.oneshot():
                t = self._proc.cpu_times()
                cpu, rss = t.user + t.system, self._proc.memory_info().rss
                children = self._proc.children(recursive=True)
        except psutil.Error:
            return None
        for child in children:
            try:
                with child.oneshot():
                    t = child.cpu_times()
                    cpu, rss = cpu + t.user + t.system, rss + child.memory_info().rss
            except psutil.Error:
                continue  # it just exited
        return cpu, rss

    def main_thread_cpu(self) -> float | None:
        """Cumulative CPU seconds of the process's main thread (the event loop of our server, of
        pycrdt-websocket's and of Node's): with ``snapshot`` it splits the CPU into the loop's
        share and the rest (storage threads, V8's garbage collector). None without a pid."""
        if self._proc is None:
            return None
        try:
            for thread in self._proc.threads():
                if thread.id == self.pid:
                    return thread.user_time + thread.system_time
        except psutil.Error:
            return None
        return None

    def start(self) -> ProcSampler:
        if self._proc is not None and self._task is None:
            self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        last = self.snapshot()
        last_t = time.monotonic()
        while last is not None:
            await asyncio.sleep(self.interval)
            now = self.snapshot()
            now_t = time.monotonic()
            if now is None:
                return
            self.samples.append((now_t, 100.0 * (now[0] - last[0]) / max(now_t - last_t, 1e-6), now[1]))
            last, last_t = now, now_t

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def window(self, start: float, end: float) -> dict[str, float | None]:
        inside = [s for s in self.samples if start < s[0] <= end + self.interval / 2]
        if not inside:
            return {"cpu_pct": None, "cpu_pct_max": None, "rss_mb": None}
        return {
            "cpu_pct": round(sum(s[1] for s in inside) / len(inside), 1),
            "cpu_pct_max": round(max(s[1] for s in inside), 1),
            "rss_mb": round(max(s[2] for s in inside) / 2**20, 1),
        }

    def latest(self) -> tuple[float, float] | None:
        """(cpu %, rss MiB) of the last sample."""
        if not self.samples:
            return None
        _t, cpu, rss = self.samples[-1]
        return cpu, rss / 2**20


def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss
