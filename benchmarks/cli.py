"""``collab bench …``: the load-test harness on the command line.

    collab bench load   --url ws://host:port --rooms 250 --clients-per-room 4 --rate 5/s --duration 60s
    collab bench load   --server node --search                 # sustainable rate at p99 <= 50 ms
    collab bench replay automerge-paper --writers 1 --readers 1 --pace max
    collab bench idle   --connections 10000
    collab bench join   --trace automerge-paper
    collab bench run    [--quick]                              # = make bench
    collab bench compare [--quick]                             # = make bench-compare

Without ``--url`` a benchmark starts its own server on loopback (``--server collab|node|pycrdt``,
default collab) and measures its CPU and RSS by pid; with ``--url``, pass ``--server-pid`` for that.
Results: JSON lines and a PNG in ``benchmarks/results/`` (``--out`` to change, ``--name`` for the
file stem).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from benchmarks.servers import COLLAB_UNLIMITED, EXTRA_KINDS, KINDS, BenchServer, make_server


def parse_rate(text: str) -> float:
    """'5/s', '300/m', '2.5' (per second) -> per second."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(?:/\s*(ms|s|sec|m|min|h))?\s*", str(text).lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad rate {text!r} (use e.g. 5/s, 300/m)")
    value = float(m.group(1))
    unit = m.group(2) or "s"
    return value * {"ms": 1000, "s": 1, "sec": 1, "m": 1 / 60, "min": 1 / 60, "h": 1 / 3600}[unit]


def parse_duration(text: str) -> float:
    """'60s', '2m', '500ms', '1h', '10' (seconds) -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|min|h)?\s*", str(text).lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (use e.g. 60s, 2m, 500ms)")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600}[m.group(2) or "s"]


def _server_flags(pairs: list[str] | None) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        flags[key.strip().lstrip("-").replace("-", "_")] = value.strip()
    return flags


def _add_target(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--url", help="websocket base URL of a running y-websocket-compatible server")
    g.add_argument("--server", choices=KINDS + EXTRA_KINDS, default="collab",
                   help="without --url: which server to start on loopback (default collab)")
    g.add_argument("--server-pid", type=int, help="with --url: the server's pid, to report its CPU and RSS")
    g.add_argument("--server-flag", action="append", metavar="KEY=VALUE",
                   help="extra `collab serve` flag for a server we start, e.g. sqlite_synchronous=NORMAL")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, help="results directory (default benchmarks/results)")
    o.add_argument("--name", help="file stem of the results (default: the command)")
    o.add_argument("--quiet", action="store_true", help="no progress lines")


@contextlib.asynccontextmanager
async def _target(args: argparse.Namespace, **default_flags: Any) -> AsyncIterator[tuple[str, int | None, BenchServer | None]]:
    """(url, pid, server-we-started-or-None)."""
    if args.url:
        yield args.url.rstrip("/"), args.server_pid, None
        return
    flags = {**default_flags, **_server_flags(args.server_flag)} if args.server.startswith("collab") else {}
    server = make_server(args.server, **flags)
    await server.start()
    try:
        yield server.url, server.pid, server
    finally:
        await server.stop()
        server.cleanup()


def _log(args: argparse.Namespace):
    return (lambda _s: None) if getattr(args, "quiet", False) else (lambda s: print(s, file=sys.stderr, flush=True))


# -- load ----------------------------------------------------------------------------------------


async def _load(args: argparse.Namespace) -> int:
    from benchmarks import plots
    from benchmarks.load import LoadRunner, LoadSpec, default_workers, search_sustainable, step_passes
    from benchmarks.report import JsonLines

    name = args.name or "load"
    async with _target(args) as (url, pid, server):
        label = server.kind if server else url
        spec = LoadSpec(url=url, rooms=args.rooms, clients_per_room=args.clients_per_room,
                        senders_per_room=args.senders_per_room, workers=args.workers or default_workers())
        out = JsonLines(name, args.out, header={"command": " ".join(sys.argv[1:]), "server": label,
                                                "rooms": spec.rooms, "clients": spec.clients})
        async with LoadRunner(spec, server_pid=pid, server_label=label, progress=not args.quiet) as runner:
            out.write({"kind": "connect", **runner.connect_result})
            if args.search:
                search = await search_sustainable(
                    runner, start_rate=args.start_rate or max(100.0, spec.senders * 0.5), factor=args.factor,
                    step_duration=args.step_duration, drain=args.drain, p99_limit_ms=args.p99_limit * 1000)
                for step in search["_full_steps"]:
                    out.write(step)
                out.write(search)
                plots.plot_search({label: search}, out.dir / f"{name}.png", p99_limit=args.p99_limit * 1000)
                verdict = (f"sustainable: {search['sustainable_updates_per_s']:,.0f} updates/s at p99 "
                           f"{search['sustainable_p99_ms']} ms" + (f" (a lower bound: {search['lower_bound_reason']})" if search["client_limited"] else ""))
            else:
                profiler = None
                if args.profile and pid:
                    from benchmarks.profile import Profiler

                    profiler = Profiler(pid, args.duration, out.dir / name)
                    await profiler.__aenter__()
                step = await runner.step(args.rate * spec.senders, args.duration, drain=args.drain,
                                         warmup=args.warmup)
                if profiler is not None:
                    await profiler.__aexit__(None, None, None)
                    step["profile"] = str(profiler.txt) if profiler.error is None else profiler.error
                ok, why = step_passes(step, args.p99_limit * 1000)
                step["passed"], step["verdict"] = ok, why
                out.write(step)
                plots.plot_load(step, out.dir / f"{name}.png")
                verdict = f"{'sustained' if ok else 'NOT sustained'}: {why}"
    print(f"{verdict}\nresults: {out.path} and {out.dir / (name + '.png')}")
    return 0


# -- replay --------------------------------------------------------------------------------------


async def _replay(args: argparse.Namespace) -> int:
    from benchmarks.replay import build_updates, load_trace, reference_rate, replay
    from benchmarks.report import JsonLines

    log = _log(args)
    name = args.name or "replay"
    trace = load_trace(args.trace)
    log(f"building {args.limit or len(trace['txns']):,} updates of {trace['name']} for {args.writers} writer(s)…")
    built = build_updates(trace, writers=args.writers, block=args.block, limit=args.limit, log=log)
    if args.writers == 1 and args.pace == "max":
        reference_rate(trace, built, args.limit)
    log(f"  built in {built.build_seconds:.1f}s; pycrdt alone: "
        + (f"{built.inprocess_txns_per_s:,.0f} txns/s applying the trace, " if built.inprocess_txns_per_s else "")
        + f"{built.apply_updates_per_s:,.0f} updates/s applying the updates")
    async with _target(args, **COLLAB_UNLIMITED) as (url, _pid, server):
        # the Node reference server keeps documents in memory only: nothing to check after a restart
        durable = server is not None and server.kind != "node"
        restart = server.restart if (durable and not args.no_restart_check) else None

        async def do_restart() -> None:
            assert restart is not None
            await restart()

        out = JsonLines(name, args.out, header={"command": " ".join(sys.argv[1:]), "server": server.kind if server else url})
        profiler = None
        if args.profile and _pid:
            from benchmarks.profile import Profiler

            profiler = Profiler(_pid, args.profile, out.dir / name)
            await profiler.__aenter__()
        result = await replay(url, built, writers=args.writers, readers=args.readers, pace=args.pace,
                              speed=args.speed, max_gap=args.max_gap, typing_rate=args.typing_rate,
                              restart=do_restart if restart else None, log=log)
        if profiler is not None:
            await profiler.__aexit__(None, None, None)
            result["profile"] = str(profiler.txt) if profiler.error is None else profiler.error
        out.write(result)
    from benchmarks import plots

    plots.plot_replay(result, out.dir / f"{name}.png")
    print(f"results: {out.path} and {out.dir / (name + '.png')}")
    return 0 if result["verified"] else 1


# -- idle ----------------------------------------------------------------------------------------


async def _idle(args: argparse.Namespace) -> int:
    from benchmarks.idle import idle
    from benchmarks.report import JsonLines

    name = args.name or "idle"
    async with _target(args) as (url, pid, server):
        if pid is None:
            print("collab bench idle: needs the server's pid (--server-pid) to read its memory", file=sys.stderr)
            return 2
        out = JsonLines(name, args.out, header={"command": " ".join(sys.argv[1:]), "server": server.kind if server else url})
        result = await idle(url, pid, connections=args.connections, per_room=args.per_room, doc_chars=args.doc_chars,
                            log=_log(args))
        out.write(result)
    from benchmarks import plots

    plots.plot_bars({"per idle connection": result["per_connection_kb"], "per loaded room": result["per_room_kb"]},
                    out.dir / f"{name}.png", f"server memory, {result['opened']:,} connections", "KiB", target=30)
    print(f"{result['per_connection_kb']} KiB per idle connection, {result['per_room_kb']} KiB per loaded room\n"
          f"results: {out.path} and {out.dir / (name + '.png')}")
    return 0


# -- join ----------------------------------------------------------------------------------------


async def _join(args: argparse.Namespace) -> int:
    from benchmarks.join import join_times
    from benchmarks.replay import build_updates, load_trace, replay
    from benchmarks.report import JsonLines

    log = _log(args)
    name = args.name or "join"
    if args.url and not args.room:
        print("collab bench join: with --url, give --room (a room that already holds the document)", file=sys.stderr)
        return 2
    extra = {"compact_after_updates": 10**9, "compact_after_bytes": 10**12} if args.no_compaction else {}
    async with _target(args, **COLLAB_UNLIMITED, **extra) as (url, _pid, server):
        out = JsonLines(name, args.out, header={"command": " ".join(sys.argv[1:]), "server": server.kind if server else url})
        expected = None
        room = args.room
        if room is None:
            trace = load_trace(args.trace)
            log(f"storing {trace['name']} update by update through the server…")
            built = build_updates(trace, limit=args.limit, log=log)
            populated = await replay(url, built, readers=1, pace="max", log=log)
            out.write({**populated, "purpose": "populate"})
            room, expected = populated["room"], built.end_content
        result = await join_times(url, room, server=server if server and server.kind != "node" else None,
                                  expected=expected, warm=args.warm, cold=args.cold, log=log)
        out.write(result)
    from benchmarks import plots

    plots.plot_bars({"warm join": result["warm_ms"]["median"], "cold join": result["cold_ms"]["median"]},
                    out.dir / f"{name}.png", f"join a {result['document_bytes']:,}-byte document", "ms")
    print(f"warm {result['warm_ms']['median']} ms, cold {result['cold_ms']['median']} ms"
          + (f" (cold/warm {result.get('cold_over_warm')})" if result.get("cold_over_warm") else "")
          + f"\nresults: {out.path} and {out.dir / (name + '.png')}")
    return 0


# -- wiring --------------------------------------------------------------------------------------


def _run(coro_fn):
    def func(args: argparse.Namespace) -> int:
        from benchmarks.servers import raise_fd_limit

        raise_fd_limit()
        try:
            return asyncio.run(coro_fn(args))
        except KeyboardInterrupt:
            return 130

    return func


def _make_run(args: argparse.Namespace) -> int:
    from benchmarks import run

    argv = ["--quick"] if args.quick else []
    if args.nice is not None:
        argv += ["--nice", str(args.nice)]
    return run.main(argv)


def _make_compare(args: argparse.Namespace) -> int:
    from benchmarks import compare

    argv = ["--quick"] if args.quick else []
    if args.nice is not None:
        argv += ["--nice", str(args.nice)]
    if args.servers:
        argv += ["--servers", args.servers]
    return compare.main(argv)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    bench = subparsers.add_parser("bench", help="load-test and compare y-websocket servers",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = bench.add_subparsers(dest="bench_command", required=True, parser_class=type(bench))

    load = sub.add_parser("load", help="drive a server with many clients typing in rooms")
    _add_target(load)
    load.add_argument("--rooms", type=int, default=250)
    load.add_argument("--clients-per-room", type=int, default=4)
    load.add_argument("--senders-per-room", type=int, help="clients per room that type (default: all)")
    load.add_argument("--rate", type=parse_rate, default=5.0, help="updates per second per typing client (5/s)")
    load.add_argument("--duration", type=parse_duration, default=60.0, help="how long to send (60s)")
    load.add_argument("--warmup", type=parse_duration, default=1.0, help="first seconds left out of the stats (1s)")
    load.add_argument("--drain", type=parse_duration, default=3.0, help="wait for late deliveries (3s)")
    load.add_argument("--workers", type=int, help="generator processes (default: half the cores, at least 1)")
    load.add_argument("--profile", action="store_true",
                      help="record the server with py-spy during the run: <name>-profile.txt and .svg")
    load.add_argument("--search", action="store_true",
                      help="step the total rate up until p99 exceeds --p99-limit: the sustainable rate")
    load.add_argument("--start-rate", type=float, help="search: first total rate, updates/s")
    load.add_argument("--factor", type=float, default=1.5, help="search: rate multiplier per step")
    load.add_argument("--step-duration", type=parse_duration, default=6.0, help="search: seconds per step")
    load.add_argument("--p99-limit", type=parse_duration, default=0.05, help="search: p99 bound (50ms)")
    load.set_defaults(func=_run(_load))

    rp = sub.add_parser("replay", help="replay a real editing trace through a server and verify the text")
    rp.add_argument("trace", help="trace file or name in ../shared/traces (automerge-paper, seph-blog1)")
    _add_target(rp)
    rp.add_argument("--writers", type=int, default=1, help="concurrent writers (transactions dealt in blocks)")
    rp.add_argument("--readers", type=int, default=1, help="clients that only receive")
    rp.add_argument("--block", type=int, default=100, help="transactions per writer turn (100)")
    rp.add_argument("--pace", choices=("max", "recorded"), default="max")
    rp.add_argument("--speed", type=float, default=1.0, help="recorded pace: speed-up factor")
    rp.add_argument("--max-gap", type=parse_duration, default=1.0, help="recorded pace: longest pause kept")
    rp.add_argument("--typing-rate", type=float, default=10.0,
                    help="recorded pace for traces without usable timestamps: transactions/s")
    rp.add_argument("--limit", type=int, help="only the first N transactions")
    rp.add_argument("--no-restart-check", action="store_true", help="skip verifying the text after a restart")
    rp.add_argument("--profile", type=parse_duration, metavar="SECONDS",
                    help="record the server with py-spy for the first SECONDS of the replay")
    rp.set_defaults(func=_run(_replay))

    idle = sub.add_parser("idle", help="server memory per idle connection and per loaded room")
    _add_target(idle)
    idle.add_argument("--connections", type=int, default=10_000)
    idle.add_argument("--per-room", type=int, default=10, help="connections per room (10)")
    idle.add_argument("--doc-chars", type=int, default=1000, help="size of each room's document (1000)")
    idle.set_defaults(func=_run(_idle))

    join = sub.add_parser("join", help="time for a new client to get a long-history document, cold and warm")
    _add_target(join)
    join.add_argument("--trace", default="automerge-paper", help="history to store update by update")
    join.add_argument("--limit", type=int, help="only the first N transactions of the trace")
    join.add_argument("--room", help="with --url: an existing room to join instead of storing a trace")
    join.add_argument("--warm", type=int, default=5, help="warm joins (5)")
    join.add_argument("--cold", type=int, default=3, help="cold joins, one server restart each (3)")
    join.add_argument("--no-compaction", action="store_true",
                      help="our server: never fold the log into a snapshot (worst case: replay every update)")
    join.set_defaults(func=_run(_join))

    run = sub.add_parser("run", help="our server's benchmark suite (make bench)")
    run.add_argument("--quick", action="store_true", help="a small version (~1 minute)")
    run.add_argument("--nice", type=int, help="nice value for the benchmark and its servers (e.g. -10 as root)")
    run.set_defaults(func=_make_run)

    cmp_ = sub.add_parser("compare", help="this server vs y-websocket-server vs pycrdt-websocket (make bench-compare)")
    cmp_.add_argument("--quick", action="store_true", help="a small version (~2 minutes)")
    cmp_.add_argument("--servers", help="comma-separated subset of collab,node,pycrdt (and collab-normal)")
    cmp_.add_argument("--nice", type=int, help="nice value for the benchmark and its servers (e.g. -10 as root)")
    cmp_.set_defaults(func=_make_compare)
    return bench


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.cli …`` — same as ``collab bench …``."""
    parser = argparse.ArgumentParser(prog="collab")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
