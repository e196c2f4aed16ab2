"""Load generator: many y-websocket clients in rooms, sending small real edits at a fixed rate.

Theory of operation
-------------------
* Clients are spread over worker *processes* by room (every client of a room lives in the same
  worker), so a sender and its receivers share one clock and one side table
  ``pending[(client, clock)] -> [send time, deliveries outstanding, step, second]``.
* Every update is prebuilt before a step starts (``ywire.TextAppender``: an append to the room's
  ``Y.Text`` after the sender's own previous insert, ~30 bytes like a keystroke, already framed and
  masked), so a send is one ``transport.write``. Receivers never run a CRDT: they read the
  ``(client, clock)`` of the relayed update (four varints) and look it up.
* Each step has a schedule (every sender at ``rate`` with a random phase); the worker sends what is
  due, sleeps until the next send (at least ``SEND_TICK``: never a busy loop, which would take
  the CPU the server under test needs), records how late each send was (*send slip*) and
  measures its own event-loop lag. Slip or lag above a few ms, or a worker near 100% CPU, means
  the client side was saturated: the step reports ``client.saturated`` and the numbers are a
  lower bound for the server.
* Latency is sender→receiver: from the moment a frame is written to the socket until each other
  member of the room has it. Deliveries still missing after the drain window count as infinitely
  late (so losing >1% makes p99 infinite) and are reported as ``undelivered``.
* Servers that echo an update back to its sender (the Node reference server, pycrdt-websocket)
  have those echoes counted in ``frames_out`` but not in latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from benchmarks import wsraw, ywire
from benchmarks.servers import ProcSampler, cpu_pressure
from benchmarks.stats import finite, from_bytes, percentiles

# The send loop sleeps at least this long between sends that are due (whatever is due when it
# wakes goes out at once). Until 2026-11-24 it slept only for gaps over 0.5 ms and otherwise
# yielded with sleep(0): with ~5,000 sends/s per worker most gaps are shorter, so each worker
# spun its event loop between sends -- 51% of a core per worker at 10,000 updates/s, against 21%
# with this tick, on a 2-core host where every core the generator burns is taken from the server
# under test (p50 6.4 -> 3.7 ms for the same server at the same load). The tick is libuv's timer
# resolution; each send's slip is still measured from its scheduled time.
SEND_TICK = 0.001
SLIP_LIMIT_MS = 10.0  # p99 of send slip above this: the generator could not keep its schedule
LAG_LIMIT_MS = 20.0  # p99 of event-loop lag above this: the generator's loop was overloaded
CPU_LIMIT = 0.90  # a worker using this share of a core is saturated

_STEP2_EMPTY_FRAME = b""  # built lazily (masking needs os.urandom, fine at import, but keep it cheap)


def default_workers() -> int:
    """Generator processes: two at least (one process receiving 20k+ frames/s adds its own
    queueing to the measured latency, even below 100% CPU), half the cores on bigger machines."""
    n = os.cpu_count() or 1
    return max(2, min(4, n // 2))


# ---------------------------------------------------------------------------------------------
# worker side


@dataclass(slots=True)
class _Client:
    index: int
    room: int
    cid: int
    sender: bool
    appender: ywire.TextAppender | None
    conn: wsraw.RawConnection | None = None
    connect_started: float = 0.0
    connect_s: float | None = None
    step1_at: float = 0.0
    sync_s: float | None = None
    error: str | None = None


class _StepStats:
    __slots__ = ("step", "start", "duration", "sent", "expected", "received", "echo", "unmatched", "other",
                 "lat_by_sec", "frames_by_sec", "sent_by_sec", "slips", "lags", "closes", "skipped",
                 "recent", "wbuf_max", "cpu0", "frames_total")

    def __init__(self, step: int, start: float, duration: float, drain: float) -> None:
        seconds = int(math.ceil(duration + drain)) + 2
        self.step = step
        self.start = start
        self.duration = duration
        self.sent = 0
        self.expected = 0
        self.received = 0
        self.echo = 0
        self.unmatched = 0
        self.other = 0
        self.lat_by_sec = [array("d") for _ in range(seconds)]
        self.frames_by_sec = [0] * seconds
        self.sent_by_sec = [0] * seconds
        self.slips = array("d")
        self.lags = array("d")
        self.closes: Counter[str] = Counter()
        self.skipped = 0
        self.recent = array("d")
        self.wbuf_max = 0
        self.frames_total = 0
        t = os.times()
        self.cpu0 = t.user + t.system


class LoadWorker:
    def __init__(self, spec: dict[str, Any], pipe) -> None:
        self.spec = spec
        self.pipe = pipe
        self.url: str = spec["url"]
        self.clients: list[_Client] = []
        self.rooms: dict[int, list[_Client]] = {}
        self.room_names: dict[int, str] = {}
        self.pending: dict[tuple[int, int], list] = {}
        self.step: _StepStats | None = None
        self.closing = False
        self.unexpected_closes: Counter[str] = Counter()
        self.frames_outside = 0
        self.schedule: tuple[array, list, list] | None = None
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        global _STEP2_EMPTY_FRAME
        _STEP2_EMPTY_FRAME = wsraw.client_frame(ywire.STEP2_EMPTY)
        rnd = random.Random(spec["seed"])
        index = 0
        for room_index, name, n_clients, n_senders in spec["rooms"]:
            self.room_names[room_index] = name
            members = []
            for j in range(n_clients):
                cid = spec["cid_base"] + index
                sender = j < n_senders
                client = _Client(index, room_index, cid, sender, ywire.TextAppender(cid) if sender else None)
                members.append(client)
                self.clients.append(client)
                index += 1
            self.rooms[room_index] = members
        self.rnd = rnd
        self.local_spread = spec.get("local_spread", 0)

    # -- plumbing --------------------------------------------------------------------------------

    def send_parent(self, message: dict[str, Any]) -> None:
        self.pipe.send(message)

    def _on_pipe(self) -> None:
        try:
            message = self.pipe.recv()
        except EOFError:
            message = {"cmd": "exit"}
        self.inbox.put_nowait(message)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._on_pipe)
        os.set_blocking(self.pipe.fileno(), True)  # uvloop made it non-blocking; sends must not fail
        try:
            while True:
                message = await self.inbox.get()
                cmd = message["cmd"]
                if cmd == "connect":
                    self.send_parent({"type": "connected", **await self.connect_all(message)})
                elif cmd == "prepare":
                    self.prepare(message)
                    self.send_parent({"type": "ready"})
                elif cmd == "go":
                    result = await self.run_step(message)
                    self.send_parent({"type": "result", **result})
                elif cmd == "probe":
                    self.send_parent({"type": "probed", **await self.probe(message)})
                elif cmd == "close":
                    await self.close_all()
                    self.send_parent({"type": "closed"})
                    return
                elif cmd == "exit":
                    await self.close_all(abort=True)
                    return
        finally:
            loop.remove_reader(self.pipe.fileno())

    # -- connections -----------------------------------------------------------------------------

    async def connect_all(self, message: dict[str, Any]) -> dict[str, Any]:
        concurrency = message.get("concurrency", 64)
        timeout = message.get("timeout", 30.0)
        sem = asyncio.Semaphore(concurrency)
        started = time.monotonic()

        async def one(client: _Client) -> None:
            async with sem:
                client.connect_started = time.monotonic()
                local = wsraw.local_host_for(client.index + self.spec["index_base"], self.local_spread)
                try:
                    conn = await wsraw.connect(self.url, self.room_names[client.room], on_message=self.on_message,
                                               on_close=self.on_close, tag=client, local_host=local,
                                               timeout=timeout)
                except (OSError, ConnectionError, TimeoutError) as exc:
                    client.error = type(exc).__name__ + ": " + str(exc)[:100]
                    return
                now = time.monotonic()
                client.conn = conn
                client.connect_s = now - client.connect_started
                client.step1_at = now
                conn.write(wsraw.client_frame(ywire.STEP1_EMPTY))

        await asyncio.gather(*(one(c) for c in self.clients))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(c.sync_s is not None or c.conn is None or c.conn.transport is None for c in self.clients):
                break
            await asyncio.sleep(0.02)
        errors = Counter(c.error or "not synced" for c in self.clients if c.sync_s is None)
        return {
            "connect_s": array("d", [c.connect_s for c in self.clients if c.connect_s is not None]).tobytes(),
            "sync_s": array("d", [c.sync_s for c in self.clients if c.sync_s is not None]).tobytes(),
            "errors": dict(errors),
            "seconds": time.monotonic() - started,
        }

    def on_close(self, conn: wsraw.RawConnection) -> None:
        if self.closing:
            return
        code = str(conn.close_code)
        self.unexpected_closes[code] += 1
        if self.step is not None:
            self.step.closes[code] += 1

    def on_message(self, conn: wsraw.RawConnection, msg: bytes) -> None:
        now = time.monotonic()
        st = self.step
        if st is not None:
            sec = int(now - st.start)
            if 0 <= sec < len(st.frames_by_sec):
                st.frames_by_sec[sec] += 1
            st.frames_total += 1
        else:
            self.frames_outside += 1
        if len(msg) < 3 or msg[0] != 0:
            if st is not None:
                st.other += 1
            return
        sub = msg[1]
        if sub == 2:
            # relayed update: read (client, clock) of its first struct — inline varints
            pos = 2
            while msg[pos] & 0x80:
                pos += 1
            pos += 1
            if msg[pos] == 0:  # no structs (a pure delete set): not ours
                if st is not None:
                    st.other += 1
                return
            while msg[pos] & 0x80:  # struct-group count
                pos += 1
            pos += 1
            while msg[pos] & 0x80:  # struct count
                pos += 1
            pos += 1
            cid = 0
            shift = 0
            while True:
                b = msg[pos]
                pos += 1
                cid |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
            client: _Client = conn.tag  # type: ignore[assignment]
            if cid == client.cid:
                if st is not None:
                    st.echo += 1
                return
            clock = 0
            shift = 0
            while True:
                b = msg[pos]
                pos += 1
                clock |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
            entry = self.pending.get((cid, clock))
            if entry is None:
                if st is not None:
                    st.unmatched += 1
                return
            latency = now - entry[0]
            owner: _StepStats = entry[2]
            owner.lat_by_sec[entry[3]].append(latency)
            owner.received += 1
            owner.recent.append(latency)
            entry[1] -= 1
            if entry[1] <= 0:
                del self.pending[(cid, clock)]
        elif sub == 0:  # the server's step 1: answer like a client with nothing to add
            conn.write(_STEP2_EMPTY_FRAME)
        elif sub == 1:  # step 2: initial sync done
            client = conn.tag  # type: ignore[assignment]
            if client.sync_s is None:
                client.sync_s = now - client.step1_at
        elif st is not None:
            st.other += 1

    async def close_all(self, abort: bool = False) -> None:
        self.closing = True
        conns = [c.conn for c in self.clients if c.conn is not None and c.conn.transport is not None]
        if abort:
            for conn in conns:
                conn.abort()
            return
        sem = asyncio.Semaphore(500)

        async def one(conn: wsraw.RawConnection) -> None:
            async with sem:
                await conn.close(timeout=2.0)

        await asyncio.gather(*(one(c) for c in conns), return_exceptions=True)

    # -- steps -----------------------------------------------------------------------------------

    async def probe(self, message: dict[str, Any]) -> dict[str, Any]:
        """One update from the first sender of up to ``rooms`` rooms, all at once: how long until
        every room-mate has it (is the server responsive, or still working off a backlog?)."""
        st = _StepStats(-1, time.monotonic(), 0.0, message["timeout"])
        self.step = st
        try:
            for members in list(self.rooms.values())[: message["rooms"]]:
                client = next((c for c in members if c.sender and c.conn is not None and c.conn.transport), None)
                if client is None or client.appender is None:
                    continue
                receivers = sum(1 for o in members if o is not client and o.conn is not None and o.conn.transport)
                update, clock = client.appender.append(f"{client.cid:x}:probe;")
                if receivers:
                    self.pending[(client.cid, clock)] = [time.monotonic(), receivers, st, 0]
                    st.expected += receivers
                client.conn.write(wsraw.client_frame(ywire.update_message(update)))
            deadline = time.monotonic() + message["timeout"]
            while st.received < st.expected and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        finally:
            self.step = None
            for key in [k for k, e in self.pending.items() if e[2] is st]:
                del self.pending[key]
        lat = st.lat_by_sec[0]
        return {"max_ms": max(lat) * 1000 if lat else None, "missing": st.expected - st.received}

    def prepare(self, message: dict[str, Any]) -> None:
        """Build every frame of the next step: a schedule sorted by time (offsets from step start)."""
        rate: float = message["rate"]
        duration: float = message["duration"]
        period = 1.0 / rate
        entries: list[tuple[float, int, bytes, tuple[int, int]]] = []
        for client in self.clients:
            if not client.sender or client.appender is None:
                continue
            phase = self.rnd.random() * period
            appender = client.appender
            k = 0
            while True:
                t = phase + k * period
                if t >= duration:
                    break
                seq = appender.clock
                update, clock = appender.append(f"{client.cid:x}:{seq};")
                frame = wsraw.client_frame(ywire.update_message(update))
                entries.append((t, client.index, frame, (client.cid, clock)))
                k += 1
        entries.sort(key=lambda e: e[0])
        times = array("d", (e[0] for e in entries))
        senders = [self.clients[e[1]] for e in entries]
        frames = [(e[2], e[3]) for e in entries]
        self.schedule = (times, senders, frames)

    async def run_step(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.schedule is not None
        times, senders, frames = self.schedule
        self.schedule = None
        start: float = message["start_at"]
        duration: float = message["duration"]
        drain: float = message["drain"]
        st = _StepStats(message["step"], start, duration, drain)
        warmup = float(message.get("warmup", 0.0))
        delay = start - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self.step = st
        lag_task = asyncio.create_task(self._lag_probe(st, start + duration, start + warmup))
        progress_task = asyncio.create_task(self._progress(st, start + duration + drain))
        try:
            await self._send_schedule(st, times, senders, frames, warmup)
            # drain: wait for outstanding deliveries of this step
            deadline = start + duration + drain
            while st.received < st.expected and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            end_wait = max(0.0, start + duration + 0.2 - time.monotonic())
            if end_wait:
                await asyncio.sleep(end_wait)
        finally:
            lag_task.cancel()
            progress_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag_task
            with contextlib.suppress(asyncio.CancelledError):
                await progress_task
        self.step = None
        stale = [key for key, entry in self.pending.items() if entry[2] is st]
        for key in stale:
            del self.pending[key]
        t = os.times()
        cpu = t.user + t.system - st.cpu0
        wall = time.monotonic() - start
        slips = sorted(st.slips)
        lags = sorted(st.lags)

        def q(values: list[float], p: float) -> float:
            return values[min(len(values) - 1, int(p * len(values)))] * 1000 if values else 0.0

        return {
            "sent": st.sent, "expected": st.expected, "received": st.received, "echo": st.echo,
            "unmatched": st.unmatched, "other": st.other, "frames_total": st.frames_total,
            "lat_by_sec": [a.tobytes() for a in st.lat_by_sec],
            "frames_by_sec": st.frames_by_sec, "sent_by_sec": st.sent_by_sec,
            "slip_p99_ms": q(slips, 0.99), "slip_max_ms": q(slips, 1.0),
            "lag_p99_ms": q(lags, 0.99), "lag_max_ms": q(lags, 1.0),
            "cpu_s": cpu, "wall_s": wall, "closes": dict(st.closes), "skipped": st.skipped,
            "write_buffer_max": st.wbuf_max,
        }

    async def _send_schedule(self, st: _StepStats, times: array, senders: list[_Client],
                             frames: list[tuple[bytes, tuple[int, int]]], warmup: float) -> None:
        start = st.start
        rooms = self.rooms
        pending = self.pending
        slips = st.slips
        sent_by_sec = st.sent_by_sec
        monotonic = time.monotonic
        n = len(times)
        j = 0
        while j < n:
            now = monotonic()
            rel = now - start
            while j < n and times[j] <= rel:
                client = senders[j]
                conn = client.conn
                frame, uid = frames[j]
                if conn is None or conn.transport is None:
                    st.skipped += 1
                    j += 1
                    continue
                wbuf = conn.transport.get_write_buffer_size()
                if wbuf > st.wbuf_max:
                    st.wbuf_max = wbuf
                if wbuf > 4 * 1024 * 1024:  # the server stopped reading this socket: don't pile up
                    st.skipped += 1
                    j += 1
                    continue
                sent_at = monotonic()
                conn.transport.write(frame)
                receivers = 0
                for other in rooms[client.room]:
                    if other is not client and other.conn is not None and other.conn.transport is not None:
                        receivers += 1
                if receivers:
                    sec = int(times[j])
                    pending[uid] = [sent_at, receivers, st, sec]
                    st.expected += receivers
                    sent_by_sec[sec] += 1
                else:
                    sent_by_sec[int(times[j])] += 1
                if times[j] >= warmup:
                    slips.append(sent_at - start - times[j])
                st.sent += 1
                j += 1
            if j < n:
                wait = times[j] - (monotonic() - start)
                await asyncio.sleep(max(wait, SEND_TICK))

    async def _lag_probe(self, st: _StepStats, until: float, after: float) -> None:
        interval = 0.005
        while time.monotonic() < until:
            t0 = time.monotonic()
            await asyncio.sleep(interval)
            if t0 >= after:
                st.lags.append(max(0.0, time.monotonic() - t0 - interval))

    async def _progress(self, st: _StepStats, until: float) -> None:
        sec = 0
        last_sent = last_frames = 0
        while True:
            target = st.start + sec + 1
            await asyncio.sleep(max(0.0, target - time.monotonic()))
            recent = sorted(st.recent)
            st.recent = array("d")
            self.send_parent({
                "type": "progress", "sec": sec, "sent": st.sent - last_sent, "frames": st.frames_total - last_frames,
                "p50": recent[len(recent) // 2] * 1000 if recent else None,
                "p99": recent[min(len(recent) - 1, int(0.99 * len(recent)))] * 1000 if recent else None,
                "n": len(recent), "outstanding": st.expected - st.received,
            })
            last_sent, last_frames = st.sent, st.frames_total
            sec += 1
            if target >= until:
                return


def _worker_entry(fd: int) -> None:
    """Entry point of a worker process (``python -m benchmarks.load --worker-fd FD``)."""
    from multiprocessing.connection import Connection

    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    from benchmarks.servers import raise_fd_limit

    raise_fd_limit()
    pipe = Connection(fd)
    spec = pipe.recv()

    async def main() -> None:
        await LoadWorker(spec, pipe).run()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def spawn_worker(spec: dict[str, Any]):
    """Start a worker process with a pickle pipe on a socketpair; returns (Popen, Connection).

    A plain subprocess rather than multiprocessing: spawn would re-import the caller's __main__
    (scripts without a main guard break) and fork would copy the caller's event loop."""
    import socket
    import subprocess
    from multiprocessing.connection import Connection

    from benchmarks.servers import ROOT

    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.load", "--worker-fd", str(theirs.fileno())],
                            pass_fds=[theirs.fileno()], cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL)
    theirs.close()
    pipe = Connection(ours.detach())
    pipe.send(spec)
    return proc, pipe


# ---------------------------------------------------------------------------------------------
# parent side


@dataclass
class LoadSpec:
    url: str
    rooms: int = 250
    clients_per_room: int = 4
    senders_per_room: int | None = None  # None: every client sends
    workers: int = field(default_factory=default_workers)
    room_prefix: str = ""
    connect_concurrency: int = 64
    connect_timeout: float = 30.0
    seed: int | None = None

    @property
    def clients(self) -> int:
        return self.rooms * self.clients_per_room

    @property
    def senders(self) -> int:
        per = self.clients_per_room if self.senders_per_room is None else min(self.senders_per_room, self.clients_per_room)
        return self.rooms * per


class LoadRunner:
    """Spawns the worker processes, connects every client, then runs steps on demand.

        async with LoadRunner(spec, server_pid=pid) as runner:
            result = await runner.step(total_rate=2000, duration=10)
    """

    def __init__(self, spec: LoadSpec, *, server_pid: int | None = None, server_label: str = "",
                 progress: bool = True, out=sys.stderr) -> None:
        self.spec = spec
        self.server_pid = server_pid
        self.server_label = server_label
        self.progress = progress
        self.out = out
        self.workers: list[tuple[Any, Any]] = []  # (process, pipe)
        self.inboxes: list[asyncio.Queue[dict[str, Any]]] = []
        self.connect_result: dict[str, Any] = {}
        self.steps = 0
        self.sampler: ProcSampler | None = None
        run_id = random.Random(spec.seed).getrandbits(32) if spec.seed is not None else random.getrandbits(32)
        self.room_prefix = spec.room_prefix or f"bench-{run_id:08x}"
        self.cid_base = (run_id % 100_000) * 10_000 + 1_000_000_000  # < 2**31, unique per run

    def log(self, text: str) -> None:
        if self.progress:
            print(text, file=self.out, flush=True)

    async def __aenter__(self) -> LoadRunner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        spec = self.spec
        n_workers = max(1, min(spec.workers, spec.rooms))
        per_room_senders = spec.clients_per_room if spec.senders_per_room is None else spec.senders_per_room
        assignments: list[list[tuple[int, str, int, int]]] = [[] for _ in range(n_workers)]
        for r in range(spec.rooms):
            assignments[r % n_workers].append((r, f"{self.room_prefix}-{r}", spec.clients_per_room,
                                               min(per_room_senders, spec.clients_per_room)))
        loop = asyncio.get_running_loop()
        index_base = 0
        host = spec.url.split("//", 1)[-1].split(":", 1)[0].split("/", 1)[0]
        spread = 64 if host.startswith("127.") else 0
        for w, rooms in enumerate(assignments):
            worker_spec = {
                "url": spec.url, "rooms": rooms, "cid_base": self.cid_base + index_base,
                "seed": (spec.seed or 0) * 1000 + w if spec.seed is not None else random.getrandbits(32),
                "index_base": index_base, "local_spread": spread,
            }
            index_base += sum(r[2] for r in rooms)
            proc, parent_end = spawn_worker(worker_spec)
            inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            loop.add_reader(parent_end.fileno(), self._reader(parent_end, inbox))
            os.set_blocking(parent_end.fileno(), True)
            self.workers.append((proc, parent_end))
            self.inboxes.append(inbox)
        if self.server_pid:
            self.sampler = ProcSampler(self.server_pid).start()
        self.log(f"connecting {spec.clients} clients in {spec.rooms} rooms over {n_workers} worker process(es)…")
        started = time.monotonic()
        self._broadcast({"cmd": "connect", "concurrency": spec.connect_concurrency, "timeout": spec.connect_timeout})
        replies = await self._collect("connected", timeout=spec.connect_timeout * 2 + 30)
        wall = time.monotonic() - started
        connect = from_bytes(r["connect_s"] for r in replies)
        sync = from_bytes(r["sync_s"] for r in replies)
        errors: Counter[str] = Counter()
        for r in replies:
            errors.update(r["errors"])
        self.connect_result = {
            "clients": spec.clients, "connected": int(connect.size), "synced": int(sync.size),
            "connect_ms": {k: finite(v) for k, v in percentiles(connect, qs=(50, 95, 99)).items()},
            "initial_sync_ms": {k: finite(v) for k, v in percentiles(sync, qs=(50, 95, 99)).items()},
            "errors": dict(errors), "seconds": round(wall, 2),
            "connections_per_s": round(spec.clients / wall, 1) if wall > 0 else None,
        }
        c = self.connect_result
        self.log(f"  {c['synced']}/{spec.clients} synced in {wall:.1f}s; connect p50 {c['connect_ms']['p50']} ms "
                 f"p99 {c['connect_ms']['p99']} ms; initial sync p50 {c['initial_sync_ms']['p50']} ms "
                 f"p99 {c['initial_sync_ms']['p99']} ms" + (f"; errors {dict(errors)}" if errors else ""))

    async def probe(self, rooms: int = 10, timeout: float = 2.0) -> float | None:
        """Max latency (ms) of one update in each of ``rooms`` rooms per worker; None if one was
        not delivered within ``timeout``."""
        self._broadcast({"cmd": "probe", "rooms": rooms, "timeout": timeout})
        replies = await self._collect("probed", timeout=timeout + 30)
        if any(r["missing"] for r in replies):
            return None
        values = [r["max_ms"] for r in replies if r["max_ms"] is not None]
        return max(values) if values else 0.0

    async def wait_ready(self, timeout: float = 60.0, threshold_ms: float = 50.0) -> float:
        """Wait until the server answers a probe within ``threshold_ms`` (its backlog from an
        overloaded step is gone) and its CPU has dropped; returns the seconds waited."""
        started = time.monotonic()
        while True:
            await self.wait_quiet(timeout=max(1.0, min(10.0, timeout - (time.monotonic() - started))))
            latency = await self.probe()
            if latency is not None and latency <= threshold_ms:
                break
            if time.monotonic() - started > timeout:
                self.log(f"  (server still slow after {timeout:.0f}s: probe {latency} ms; going on)")
                break
            await asyncio.sleep(1.0)
        waited = time.monotonic() - started
        if waited > 3.0:
            self.log(f"  (waited {waited:.1f}s for the server to work off its backlog)")
        return waited

    async def wait_quiet(self, timeout: float = 30.0, cpu_below: float = 20.0) -> float:
        """Wait until the server's CPU use has dropped (it finished any backlog a previous step
        left), at most ``timeout`` seconds; returns the seconds waited."""
        return await wait_quiet(self.sampler, timeout, cpu_below)

    def _reader(self, pipe, inbox: asyncio.Queue[dict[str, Any]]):
        def on_readable() -> None:
            try:
                inbox.put_nowait(pipe.recv())
            except (EOFError, OSError):
                asyncio.get_running_loop().remove_reader(pipe.fileno())
                inbox.put_nowait({"type": "dead"})
        return on_readable

    def _broadcast(self, message: dict[str, Any]) -> None:
        for _proc, pipe in self.workers:
            pipe.send(message)

    async def _collect(self, kind: str, timeout: float, on_progress=None) -> list[dict[str, Any]]:
        async def one(inbox: asyncio.Queue[dict[str, Any]]) -> dict[str, Any]:
            while True:
                message = await inbox.get()
                if message.get("type") == kind:
                    return message
                if message.get("type") == "dead":
                    raise RuntimeError("a load worker process died")
                if message.get("type") == "progress" and on_progress is not None:
                    on_progress(message)

        return list(await asyncio.wait_for(asyncio.gather(*(one(q) for q in self.inboxes)), timeout))

    async def step(self, total_rate: float, duration: float, drain: float = 3.0, label: str = "",
                   warmup: float | None = None) -> dict[str, Any]:
        """Run one step at ``total_rate`` updates/s (spread evenly over the senders) for ``duration`` s.

        The first ``warmup`` seconds are sent but left out of the latency, slip and lag figures (the
        timeline keeps them): a rate change makes every server allocate, and Node JIT-compiles.
        Default: 1 s for steps of 5 s or more, none for shorter ones (whole seconds only)."""
        if warmup is None:
            warmup = 1.0 if duration >= 5 else 0.0
        spec = self.spec
        senders = spec.senders
        rate = total_rate / senders
        self.steps += 1
        step_id = self.steps
        prepared = time.monotonic()
        self._broadcast({"cmd": "prepare", "rate": rate, "duration": duration})
        await self._collect("ready", timeout=120)
        build_s = time.monotonic() - prepared
        start_at = time.monotonic() + 0.3
        cpu0 = self.sampler.snapshot() if self.sampler else None
        main0 = self.sampler.main_thread_cpu() if self.sampler else None
        self._broadcast({"cmd": "go", "start_at": start_at, "duration": duration, "drain": drain, "step": step_id,
                         "warmup": warmup})
        self.log(f"step {step_id}{' ' + label if label else ''}: {total_rate:,.0f} updates/s "
                 f"({rate:.3g}/s × {senders} senders) for {duration:g}s (frames prebuilt in {build_s:.1f}s)")
        per_sec: dict[int, list[dict[str, Any]]] = {}
        n_workers = len(self.workers)

        def on_progress(message: dict[str, Any]) -> None:
            bucket = per_sec.setdefault(message["sec"], [])
            bucket.append(message)
            if len(bucket) == n_workers:
                sent = sum(m["sent"] for m in bucket)
                frames = sum(m["frames"] for m in bucket)
                p50s = [m["p50"] for m in bucket if m["p50"] is not None]
                p99s = [m["p99"] for m in bucket if m["p99"] is not None]
                outstanding = sum(m["outstanding"] for m in bucket)
                srv = ""
                if self.sampler is not None and (latest := self.sampler.latest()):
                    srv = f"  server cpu {latest[0]:5.1f}% rss {latest[1]:6.1f} MiB"
                lat = (f"p50 {max(p50s):7.2f} ms  p99 {max(p99s):7.2f} ms" if p99s else "no deliveries")
                self.log(f"  t={message['sec'] + 1:3d}s  in {sent:7,d}/s  out {frames:8,d}/s  {lat}  "
                         f"outstanding {outstanding:,}{srv}")

        replies = await self._collect("result", timeout=duration + drain + 120, on_progress=on_progress)
        cpu1 = self.sampler.snapshot() if self.sampler else None
        main1 = self.sampler.main_thread_cpu() if self.sampler else None
        end = start_at + duration
        result = self._merge(step_id, label, total_rate, rate, duration, start_at, end, replies, warmup)
        if cpu0 is not None and cpu1 is not None and result["updates_sent"]:
            # CPU the server spent on this step (sending, relaying, storing, draining), per update:
            # robust to other load on the machine, unlike latency.
            cpu_s = cpu1[0] - cpu0[0]
            result["server_process"]["cpu_s"] = round(cpu_s, 3)
            result["server_process"]["cpu_us_per_update"] = round(cpu_s / result["updates_sent"] * 1e6, 1)
            if main0 is not None and main1 is not None:
                # The event loop's share: the part no other core can take over.
                result["server_process"]["main_thread_us_per_update"] = round(
                    (main1 - main0) / result["updates_sent"] * 1e6, 1)
        return result

    def _merge(self, step_id: int, label: str, total_rate: float, rate: float, duration: float,
               start: float, end: float, replies: list[dict[str, Any]], warmup: float) -> dict[str, Any]:
        spec = self.spec
        seconds = max(len(r["lat_by_sec"]) for r in replies)
        lat_secs = [from_bytes(r["lat_by_sec"][s] for r in replies if s < len(r["lat_by_sec"])) for s in range(seconds)]
        import numpy as np

        skip = int(warmup)
        measured = lat_secs[skip:] if len(lat_secs) > skip else []
        all_lat = np.concatenate(measured) if measured else np.zeros(0)
        expected = sum(r["expected"] for r in replies)
        received = sum(r["received"] for r in replies)
        undelivered = max(0, expected - received)
        lat = percentiles(all_lat, missing=undelivered, qs=(50, 95, 99))
        sent = sum(r["sent"] for r in replies)
        measured_sent = sum(sum(r["sent_by_sec"][skip:int(math.ceil(duration))]) for r in replies)
        frames_window = sum(sum(r["frames_by_sec"][: int(duration)]) for r in replies)
        closes: Counter[str] = Counter()
        for r in replies:
            closes.update(r["closes"])
        skipped = sum(r["skipped"] for r in replies)
        cpu = [r["cpu_s"] / r["wall_s"] for r in replies if r["wall_s"] > 0]
        slip_p99 = max(r["slip_p99_ms"] for r in replies)
        lag_p99 = max(r["lag_p99_ms"] for r in replies)
        reasons = []
        if slip_p99 > SLIP_LIMIT_MS:
            reasons.append(f"send slip p99 {slip_p99:.1f} ms > {SLIP_LIMIT_MS:g} ms")
        if lag_p99 > LAG_LIMIT_MS:
            reasons.append(f"event-loop lag p99 {lag_p99:.1f} ms > {LAG_LIMIT_MS:g} ms")
        if cpu and max(cpu) >= CPU_LIMIT:
            reasons.append(f"worker CPU {max(cpu) * 100:.0f}% of a core")
        server = self.sampler.window(start, end) if self.sampler else {"cpu_pct": None, "cpu_pct_max": None, "rss_mb": None}
        timeline = []
        for s in range(int(math.ceil(duration))):
            arr = lat_secs[s] if s < len(lat_secs) else np.zeros(0)
            p = percentiles(arr, qs=(50, 99))
            srv = self.sampler.window(start + s, start + s + 1) if self.sampler else {}
            timeline.append({
                "t": s + 1,
                "in": sum(r["sent_by_sec"][s] for r in replies if s < len(r["sent_by_sec"])),
                "out": sum(r["frames_by_sec"][s] for r in replies if s < len(r["frames_by_sec"])),
                "p50_ms": finite(p["p50"]), "p99_ms": finite(p["p99"]),
                "server_cpu_pct": srv.get("cpu_pct"), "server_rss_mb": srv.get("rss_mb"),
            })
        result = {
            "kind": "load-step", "label": label, "server": self.server_label, "url": spec.url, "step": step_id,
            "rooms": spec.rooms, "clients": spec.clients, "senders": spec.senders,
            "target_updates_per_s": round(total_rate, 1), "rate_per_sender": round(rate, 4),
            "duration_s": duration, "warmup_s": skip, "updates_sent": sent, "updates_measured": measured_sent,
            "updates_in_per_s": round(sent / duration, 1),
            "frames_out_per_s": round(frames_window / max(1, int(duration)), 1),
            "deliveries_expected": expected, "deliveries": received, "undelivered": undelivered,
            "echoes": sum(r["echo"] for r in replies), "unmatched": sum(r["unmatched"] for r in replies),
            "latency_ms": {k: finite(v) for k, v in lat.items()},
            "latency_lost": undelivered > 0,
            "errors": {"closes": dict(closes), "skipped_sends": skipped},
            "server_process": server,
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "cpu_pressure_pct": cpu_pressure(),
            "client": {
                "workers": len(replies),
                "cpu_pct_per_worker": [round(c * 100, 1) for c in cpu],
                "send_slip_p99_ms": round(slip_p99, 2), "send_slip_max_ms": round(max(r["slip_max_ms"] for r in replies), 2),
                "loop_lag_p99_ms": round(lag_p99, 2), "loop_lag_max_ms": round(max(r["lag_max_ms"] for r in replies), 2),
                "write_buffer_max_bytes": max(r["write_buffer_max"] for r in replies),
                "saturated": bool(reasons), "saturation_reasons": reasons,
            },
            "timeline": timeline,
        }
        p = result["latency_ms"]
        self.log(f"  => in {result['updates_in_per_s']:,.0f}/s out {result['frames_out_per_s']:,.0f}/s  "
                 f"p50 {p['p50']} p95 {p['p95']} p99 {p['p99']} max {p['max']} ms"
                 + (f"  UNDELIVERED {undelivered}" if undelivered else "")
                 + (f"  closes {dict(closes)}" if closes else "")
                 + (f"  server cpu {server['cpu_pct']}% rss {server['rss_mb']} MiB" if server["cpu_pct"] is not None else "")
                 + ("  [client saturated: " + "; ".join(reasons) + "]" if reasons else ""))
        return result

    async def close(self) -> None:
        if not self.workers:
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            self._broadcast({"cmd": "close"})
            await self._collect("closed", timeout=30)
        for proc, pipe in self.workers:
            with contextlib.suppress(Exception):
                loop.remove_reader(pipe.fileno())
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), 10)
            except TimeoutError:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            pipe.close()
        self.workers = []
        if self.sampler is not None:
            await self.sampler.stop()


async def wait_quiet(sampler: ProcSampler | None, timeout: float = 30.0, cpu_below: float = 20.0) -> float:
    started = time.monotonic()
    if sampler is None:
        await asyncio.sleep(min(1.0, timeout))
        return time.monotonic() - started
    seen = len(sampler.samples)
    quiet = 0
    while time.monotonic() - started < timeout:
        await asyncio.sleep(sampler.interval)
        fresh = sampler.samples[seen:]
        seen = len(sampler.samples)
        for _t, cpu, _rss in fresh:
            quiet = quiet + 1 if cpu < cpu_below else 0
        if quiet >= 2:
            break
    return time.monotonic() - started


def step_passes(result: dict[str, Any], p99_limit_ms: float = 50.0, max_slip_ms: float = 100.0) -> tuple[bool, str]:
    """Whether a step was sustained: p99 within the limit, nothing lost, no connection closed,
    and the generator kept its schedule (every prebuilt update is sent, so the rate is the
    target rate unless sends ran late)."""
    p99 = result["latency_ms"]["p99"]
    if result["undelivered"]:
        return False, f"{result['undelivered']} deliveries missing"
    if result["errors"]["closes"]:
        return False, f"connections closed {result['errors']['closes']}"
    if result["errors"]["skipped_sends"]:
        return False, f"{result['errors']['skipped_sends']} sends skipped (server not reading)"
    if p99 is None or p99 > p99_limit_ms:
        return False, f"p99 {p99} ms > {p99_limit_ms:g} ms"
    if result["client"]["send_slip_p99_ms"] > max_slip_ms:
        return False, f"the generator fell {result['client']['send_slip_p99_ms']:.0f} ms behind its schedule"
    return True, "ok"


async def search_sustainable(runner: LoadRunner, *, start_rate: float, factor: float = 1.5,
                             max_rate: float = 1e6, step_duration: float = 6.0, drain: float = 3.0,
                             p99_limit_ms: float = 50.0, refine: int = 1, pause: float = 1.0,
                             max_steps: int = 14, retries: int = 1) -> dict[str, Any]:
    """Step the offered rate up by ``factor`` until a rate fails (p99 > limit, loss, closes), then
    bisect ``refine`` times (geometrically) between the last good and the first bad rate. Returns
    the steps and the verdict.

    A rate fails when its step fails ``retries + 1`` times in a row: a step whose p99 alone is
    over the limit is run again (loss, closes and skipped sends are never retried). One stall of
    the host -- this machine's disk pauses an fdatasync for ~100 ms every ten seconds or so,
    measured with nothing else running -- delays a tenth of a second's updates, which is a
    whole percent of a 5 s step: a single stall used to end the search, at a random rate. Every
    attempt is in ``steps`` (``attempt`` counts from 1)."""
    steps: list[dict[str, Any]] = []

    async def attempt(rate: float, label: str) -> dict[str, Any]:
        for n in range(1, retries + 2):
            if n > 1:
                await asyncio.sleep(pause)
                await runner.wait_ready(timeout=60.0, threshold_ms=p99_limit_ms)
            result = await runner.step(rate, step_duration, drain=drain, label=label)
            ok, why = step_passes(result, p99_limit_ms)
            result["passed"], result["verdict"], result["attempt"] = ok, why, n
            steps.append(result)
            if ok or not why.startswith("p99 "):
                break
        return result

    best: dict[str, Any] | None = None
    failed_rate: float | None = None
    client_limited = False
    rate = start_rate
    going_down = False
    for i in range(max_steps):
        if i:
            await runner.wait_ready(timeout=60.0, threshold_ms=p99_limit_ms)
        result = await attempt(rate, "search")
        if not result["passed"]:
            if best is None and rate / factor >= start_rate / 64:
                # even the first rate failed: walk down until a rate holds
                failed_rate = rate
                client_limited = bool(result["client"]["saturated"])
                going_down = True
                rate /= factor
                await asyncio.sleep(pause)
                continue
            if failed_rate is None or not going_down:
                failed_rate = rate
                # a failure while the generator itself was behind may be the generator's fault
                client_limited = bool(result["client"]["saturated"])
            break
        best = result
        if going_down or rate * factor > max_rate:
            break
        rate *= factor
        await asyncio.sleep(pause)
    low, high = (best["target_updates_per_s"], failed_rate) if best is not None else (None, None)
    for _ in range(int(refine) if best is not None and failed_rate is not None else 0):
        await asyncio.sleep(pause)
        await runner.wait_ready(timeout=60.0, threshold_ms=p99_limit_ms)
        mid = math.sqrt(low * high)
        result = await attempt(mid, "refine")
        if result["passed"]:
            best, low = result, mid
        else:
            high = mid
    if failed_rate is None:
        bound = "the search ended before any step failed"
    elif client_limited:
        bound = "the generator was saturated in the step that failed"
    else:
        bound = None
    return {
        "kind": "load-search", "server": runner.server_label, "clients": runner.spec.clients,
        "p99_limit_ms": p99_limit_ms,
        "sustainable_updates_per_s": best["updates_in_per_s"] if best else 0.0,
        "sustainable_p99_ms": best["latency_ms"]["p99"] if best else None,
        "sustainable_frames_out_per_s": best["frames_out_per_s"] if best else 0.0,
        "first_failing_rate": failed_rate,
        "client_limited": bound is not None,  # the sustainable rate is only a lower bound
        "lower_bound_reason": bound,
        "steps": [_step_summary(s) for s in steps],
        "_full_steps": steps,
    }


def _step_summary(s: dict[str, Any]) -> dict[str, Any]:
    return {k: s.get(k) for k in ("step", "label", "attempt", "target_updates_per_s", "updates_in_per_s",
                                  "frames_out_per_s", "latency_ms", "undelivered", "errors", "server_process",
                                  "passed", "verdict")} | {
        "client_saturated": s["client"]["saturated"], "client_cpu_pct": s["client"]["cpu_pct_per_worker"],
        "send_slip_p99_ms": s["client"]["send_slip_p99_ms"]}



if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker-fd":
        _worker_entry(int(sys.argv[2]))
    else:
        sys.exit("usage: collab bench load … (this module's own entry point is for worker processes)")
