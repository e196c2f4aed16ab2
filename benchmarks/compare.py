"""``make bench-compare``: this server against the alternatives, same load, same machine, one run.

    python -m benchmarks.compare [--quick] [--servers collab,node,pycrdt]

Servers, each started on loopback in turn, alone on the machine while it is measured:

* ``collab`` — this server, SQLite with ``synchronous=FULL`` (durability on: every update is
  fsynced before anyone sees it);
* ``node``   — the reference ``@y/websocket-server`` 0.1.1 (in memory: durability off);
* ``pycrdt`` — pycrdt-websocket 0.16 under uvicorn with a pycrdt-store ``SQLiteYStore`` per room.

For each: 1,000 clients in 250 rooms (4 per room, all typing); a rate search (from 400 updates/s,
×1.5 per step until p99 > 50 ms or loss, then three bisection steps, which end ~5% apart; before
each step a probe waits until the server has worked off any backlog) for the sustainable
updates/s; on a fresh process, latency at a fixed load (500 updates/s); a replay of the first
20,000 automerge-paper keystrokes (1 writer + 1 reader, max speed); warm and cold join of the whole
automerge-paper document; then, on a fresh process, memory per idle connection. Results:
``results/compare.jsonl``, ``results/compare.png`` and the ``compare`` section of
``results/latest.md`` (and of the repository README's benchmark block).

How each server holds the automerge-paper document for the join: ours and Node receive it through
the websocket, update by update (Node keeps it in memory only, so it has no cold join); for
pycrdt-websocket the 259,778 updates are written into its SQLite schema exactly as its ``write``
path leaves them (one row per update plus its latest 100-update checkpoint), because pushing them
through its one-commit-per-update store takes many minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from benchmarks import plots
from benchmarks.idle import idle
from benchmarks.join import join_times, populate_pycrdt_store
from benchmarks.load import LoadRunner, LoadSpec, search_sustainable, step_passes
from benchmarks.replay import Built, build_updates, load_trace, replay
from benchmarks.report import JsonLines, machine_line, num, publish, table
from benchmarks.servers import COLLAB_UNLIMITED, EXTRA_KINDS, KINDS, LABELS, PycrdtServer, make_server, raise_fd_limit, set_priority
from benchmarks.stats import fmt_ms

FULL = {
    "rooms": 250, "clients_per_room": 4, "warmup_rate": 200.0, "fixed_rate": 500.0, "fixed_duration": 8.0,
    "search_start": 400.0, "search_factor": 1.5, "refine_steps": 3, "step_duration": 10.0, "drain": 2.0,
    "p99_limit_ms": 50.0, "replay_prefix": 20_000, "join_limit": None, "join_warm": 3, "join_cold": 2, "idle_connections": 5_000,
    "max_steps": 12,
}
QUICK = {
    "rooms": 50, "clients_per_room": 4, "warmup_rate": 100.0, "fixed_rate": 200.0, "fixed_duration": 3.0,
    "search_start": 200.0, "search_factor": 2.0, "refine_steps": 1, "step_duration": 3.0, "drain": 1.0,
    "p99_limit_ms": 50.0,
    "replay_prefix": 3_000, "join_limit": 10_000, "join_warm": 2, "join_cold": 1, "idle_connections": 500,
    "max_steps": 4,
}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def measure(kind: str, cfg: dict[str, Any], prefix: Built, full: Built, out: JsonLines) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything for one server; returns (summary row, rate search). A phase that fails is
    recorded with its error and the next phase still runs."""
    flags = COLLAB_UNLIMITED if kind.startswith("collab") else {}
    server = make_server(kind, **flags)
    row: dict[str, Any] = {"kind": "compare-server", "server": kind, "label": LABELS[kind], "errors": {}}
    search: dict[str, Any] = {"steps": [], "sustainable_updates_per_s": 0.0, "sustainable_p99_ms": None,
                              "client_limited": False, "label": LABELS[kind]}
    await server.start()
    try:
        log(f"\n===== {LABELS[kind]} =====")
        try:
            # the rate search, on a fresh process, from a rate every server holds upwards
            spec = LoadSpec(url=server.url, rooms=cfg["rooms"], clients_per_room=cfg["clients_per_room"])
            async with LoadRunner(spec, server_pid=server.pid, server_label=kind) as runner:
                row["connect"] = runner.connect_result
                out.write({"kind": "connect", "server": kind, **runner.connect_result})
                await runner.step(cfg["warmup_rate"], 2.0, drain=1.0, label="warm-up", warmup=0)
                await runner.wait_ready(timeout=30.0, threshold_ms=cfg["p99_limit_ms"])
                search = await search_sustainable(
                    runner, start_rate=cfg["search_start"], factor=cfg["search_factor"],
                    step_duration=cfg["step_duration"], drain=cfg["drain"], p99_limit_ms=cfg["p99_limit_ms"],
                    max_steps=cfg["max_steps"], refine=cfg.get("refine_steps", 1))
                search["label"] = LABELS[kind]
                for step in search["_full_steps"]:
                    step.pop("timeline", None)
                    out.write(step)
                out.write(search)
            # latency at a fixed load, on a fresh process again (the search ends by overloading it)
            await server.restart()
            spec = LoadSpec(url=server.url, rooms=cfg["rooms"], clients_per_room=cfg["clients_per_room"])
            async with LoadRunner(spec, server_pid=server.pid, server_label=kind) as runner:
                await runner.step(cfg["warmup_rate"], 2.0, drain=1.0, label="warm-up", warmup=0)
                await runner.wait_ready(timeout=30.0, threshold_ms=cfg["p99_limit_ms"])
                fixed = await runner.step(cfg["fixed_rate"], cfg["fixed_duration"], drain=cfg["drain"],
                                          label="fixed load")
                ok, why = step_passes(fixed, cfg["p99_limit_ms"])
                fixed["passed"], fixed["verdict"] = ok, why
                out.write(fixed)
                row["fixed"] = fixed
        except Exception as exc:  # noqa: BLE001 - report and carry on with the other phases
            row["errors"]["load"] = f"{type(exc).__name__}: {exc}".rstrip(": ")
            log(f"  load phase failed: {row['errors']['load']}")
        row["sustainable_updates_per_s"] = search["sustainable_updates_per_s"]
        row["sustainable_p99_ms"] = search["sustainable_p99_ms"]
        row["client_limited"] = search["client_limited"]
        row["lower_bound_reason"] = search.get("lower_bound_reason")

        # replay a prefix of automerge-paper as fast as possible, on a fresh process (a server the
        # search overloaded may still be working through its backlog)
        log(f"-- replay: first {prefix.txns:,} automerge-paper keystrokes, max speed")
        try:
            await server.restart()
            rp = await replay(server.url, prefix, writers=1, readers=1, pace="max", settle_timeout=30.0, log=log)
            out.write({**rp, "server": kind})
            row["replay"] = rp
        except Exception as exc:  # noqa: BLE001
            row["errors"]["replay"] = f"{type(exc).__name__}: {exc}".rstrip(": ")
            log(f"  replay failed: {row['errors']['replay']}")

        # join the whole document
        log(f"-- join: the automerge-paper document ({full.txns:,} keystrokes)")
        try:
            await server.restart()  # a clean process: no backlog left by the load
            if isinstance(server, PycrdtServer):
                room = f"join-{full.trace}"
                rows = await asyncio.to_thread(populate_pycrdt_store, str(server.db_path), room, full.updates)
                populated: dict[str, Any] = {"how": "written into its SQLite schema", "rows": rows}
            else:
                populated_replay = await replay(server.url, full, writers=1, readers=1, pace="max",
                                                settle_timeout=60.0, log=log)
                out.write({**populated_replay, "server": kind, "purpose": "populate for join"})
                room = populated_replay["room"]
                populated = {"how": "sent through the websocket, update by update",
                             "updates_per_s": populated_replay["updates_per_s"]}
            joined = await join_times(server.url, room, server=None if kind == "node" else server,
                                      expected=full.end_content, warm=cfg["join_warm"],
                                      cold=0 if kind == "node" else cfg["join_cold"], log=log)
            joined["populated"] = populated
            out.write({**joined, "server": kind})
            row["join"] = joined
        except Exception as exc:  # noqa: BLE001
            row["errors"]["join"] = f"{type(exc).__name__}: {exc}".rstrip(": ")
            log(f"  join failed: {row['errors']['join']}")

        # idle memory on a fresh process
        log(f"-- idle: {cfg['idle_connections']:,} connections")
        try:
            await server.restart()
            idled = await idle(server.url, server.pid, connections=cfg["idle_connections"], log=log)
            out.write({**idled, "server": kind})
            row["idle"] = idled
        except Exception as exc:  # noqa: BLE001
            row["errors"]["idle"] = f"{type(exc).__name__}: {exc}".rstrip(": ")
            log(f"  idle failed: {row['errors']['idle']}")
    finally:
        await server.stop()
        server.cleanup()
    row["idle_kb_per_connection"] = row.get("idle", {}).get("per_connection_kb")
    row["cold_join_ms"] = row.get("join", {}).get("cold_ms", {}).get("median")
    out.write(row)
    return row, search


def render(rows: dict[str, dict[str, Any]], machine: dict[str, Any], cfg: dict[str, Any], quick: bool) -> str:
    kinds = list(rows)
    head = ["", *[rows[k]["label"] for k in kinds]]

    def line(label: str, fn) -> list[Any]:
        out = [label]
        for k in kinds:
            try:
                out.append(fn(rows[k]))
            except (KeyError, TypeError):
                out.append("—")
        return out

    def sustainable(r: dict[str, Any]) -> str:
        text = f"**{num(r['sustainable_updates_per_s'])}**"
        if r.get("client_limited"):
            text = "≥ " + text + f" ({r.get('lower_bound_reason') or 'client-limited'})"
        return text + f" (p99 {fmt_ms(r['sustainable_p99_ms'])})"

    def fixed(r: dict[str, Any]) -> str:
        p = r["fixed"]["latency_ms"]
        extra = f", {r['fixed']['undelivered']} lost" if r["fixed"]["undelivered"] else ""
        return f"p50 {fmt_ms(p['p50'])} / p99 **{fmt_ms(p['p99'])}** / max {fmt_ms(p['max'])}{extra}"

    clients = cfg["rooms"] * cfg["clients_per_room"]
    table_rows = [
        line(f"updates/s at p99 ≤ {cfg['p99_limit_ms']:g} ms ({clients:,} clients, {cfg['rooms']} rooms)", sustainable),
        line("frames out/s at that rate", lambda r: num(next((s["frames_out_per_s"] for s in r["_search"]["steps"]
                                                              if s["updates_in_per_s"] == r["sustainable_updates_per_s"]), None))),
        line(f"latency at a fixed {cfg['fixed_rate']:,.0f} updates/s", fixed),
        line("server CPU / RSS at the fixed load",
             lambda r: f"{num(r['fixed']['server_process']['cpu_pct'])}% / {num(r['fixed']['server_process']['rss_mb'])} MiB"),
        line(f"connect + initial sync p99 ({clients:,} clients at once)",
             lambda r: f"{fmt_ms(r['connect']['connect_ms']['p99'])} + {fmt_ms(r['connect']['initial_sync_ms']['p99'])}"),
        line("memory per idle connection", lambda r: f"**{num(r['idle']['per_connection_kb'], 1)} KiB**"),
        line("memory per loaded room (1,000-char doc)", lambda r: f"{num(r['idle']['per_room_kb'], 1)} KiB"),
        line(f"cold join, automerge-paper document ({_join_txns(cfg)} keystrokes)",
             lambda r: "n/a (in memory only)" if r["join"]["cold_ms"]["median"] is None else f"**{fmt_ms(r['join']['cold_ms']['median'])}**"),
        line(f"warm join, automerge-paper document ({_join_txns(cfg)} keystrokes)", lambda r: fmt_ms(r["join"]["warm_ms"]["median"])),
        line(f"replay first {cfg['replay_prefix']:,} keystrokes, max speed",
             lambda r: (f"{num(r['replay']['updates_per_s'])} updates/s" if r["replay"]["updates_per_s"] else "incomplete")
             + _replay_check(r["replay"])),
    ]
    if any(rows[k].get("errors") for k in kinds):
        table_rows.append(line("errors", lambda r: "; ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"))
    verdicts = []
    c, n, p = rows.get("collab"), rows.get("node"), rows.get("pycrdt")

    def ratio_text(ours: dict[str, Any], other: dict[str, Any]) -> tuple[float | None, str]:
        a, b = ours["sustainable_updates_per_s"], other["sustainable_updates_per_s"]
        if not a or not b:
            return None, "—"
        ratio = a / b
        # a lower bound on our side makes the ratio a lower bound; on theirs, an upper bound
        prefix = "≥ " if ours.get("client_limited") and not other.get("client_limited") else \
            "≤ " if other.get("client_limited") and not ours.get("client_limited") else ""
        return ratio, f"{prefix}{ratio:.2f}× ({num(a)} vs {num(b)} updates/s)"

    if c and p:
        ratio, text = ratio_text(c, p)
        verdicts.append(["≥ 3× pycrdt-websocket's sustainable updates/s", text,
                         "met" if ratio and ratio >= 3 else "NOT met"])
        cp, pp = c["fixed"]["latency_ms"]["p99"], p["fixed"]["latency_ms"]["p99"]
        lower = cp is not None and (pp is None or cp < pp)
        verdicts.append([f"lower p99 than pycrdt-websocket at {cfg['fixed_rate']:,.0f} updates/s",
                         f"{fmt_ms(cp)} vs {fmt_ms(pp)}", "met" if lower else "NOT met"])
    if c and n:
        ratio, text = ratio_text(c, n)
        verdicts.append([f"reach/beat the Node server's sustainable updates/s at {clients:,} clients "
                         "(durability on for us, off for it)", text, "met" if ratio and ratio >= 1 else "NOT met"])
    cpu_row = line("server CPU per update at the fixed load (µs, all threads)",
                   lambda r: num(r["fixed"]["server_process"].get("cpu_us_per_update")))
    main_row = line("… of which the main thread (the event loop; µs)",
                    lambda r: num(r["fixed"]["server_process"].get("main_thread_us_per_update")))
    table_rows.insert(4, cpu_row)
    table_rows.insert(5, main_row)
    return "\n".join([
        "## Comparison (`make bench-compare`)" + (" — quick run" if quick else ""),
        "",
        f"Machine: {machine_line(machine)}. Servers run one at a time on loopback, each as one process; "
        f"the load generator runs on the same machine ({_workers(rows)} process(es)).",
        "",
        table(head, table_rows),
        "",
        table(["target", "measured", ""], verdicts) if verdicts else "",
        "",
        "![make bench-compare](compare.png)",
        "",
        "Raw data: [compare.jsonl](compare.jsonl). Rate search: each step runs for "
        f"{cfg['step_duration']:g}s; the rate rises ×{cfg['search_factor']:g} until p99 > {cfg['p99_limit_ms']:g} ms "
        "twice in a row at one rate (a step over the p99 limit is run once more: one disk stall of this host, "
        "~100 ms every ten seconds or so, must not end the search), "
        f"a delivery is lost or a connection is closed, then {cfg.get('refine_steps', 1)} bisection step(s) between the last good and the first bad rate. "
        "Latency is sender→receiver, measured by the clients; a step whose generator fell behind is flagged "
        "client-limited.",
    ])


def _replay_check(r: dict[str, Any]) -> str:
    if r["verified"]:
        return ", text verified"
    problems = []
    if r["verified_clients"] < r["clients"]:
        problems.append(f"{r['clients'] - r['verified_clients']} connected client(s) diverged")
    if not r["fresh_client_ok"]:
        problems.append("a fresh client got an older text")
    if not r["complete"]:
        problems.append("not every update arrived")
    return " (" + "; ".join(problems or ["text NOT verified"]) + ")"


def _join_txns(cfg: dict[str, Any]) -> str:
    return f"{cfg['join_limit']:,}" if cfg.get("join_limit") else "259,778"


def _workers(rows: dict[str, dict[str, Any]]) -> Any:
    for r in rows.values():
        if "fixed" in r:
            return r["fixed"]["client"]["workers"]
    return "?"


async def run_all(kinds: list[str], cfg: dict[str, Any], out: JsonLines) -> tuple[dict[str, Any], dict[str, Any]]:
    trace = load_trace("automerge-paper")
    log(f"building automerge-paper updates ({cfg['join_limit'] or len(trace['txns']):,})…")
    full = build_updates(trace, writers=1, limit=cfg["join_limit"], log=log)
    prefix = build_updates(trace, writers=1, limit=cfg["replay_prefix"], log=log)
    rows: dict[str, dict[str, Any]] = {}
    searches: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        row, search = await measure(kind, cfg, prefix, full, out)
        row["_search"] = search
        rows[kind] = row
        searches[kind] = search
        await asyncio.sleep(2.0)
    return rows, searches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small version (~2-3 minutes)")
    parser.add_argument("--nice", type=int, default=None,
                        help="run the benchmark, its servers and generators at this nice value (e.g. -10, as root) "
                             "to shield them from other load on a shared machine; recorded in the results")
    parser.add_argument("--servers", default=",".join(KINDS),
                        help="comma-separated, from collab,node,pycrdt (default all three) and collab-normal")
    parser.add_argument("--no-publish", action="store_true", help="do not update results/latest.md and the README "
                        "(quick runs never do)")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS + EXTRA_KINDS]
    if unknown:
        parser.error(f"unknown server(s) {unknown}")
    raise_fd_limit()
    set_priority(args.nice)
    cfg = QUICK if args.quick else FULL
    name = "compare-quick" if args.quick else "compare"
    out = JsonLines(name, header={"config": cfg, "servers": kinds, "quick": args.quick})
    started = time.monotonic()
    rows, searches = asyncio.run(run_all(kinds, cfg, out))
    body = render(rows, out.machine, cfg, args.quick)
    if args.quick:
        body = body.replace("compare.png", "compare-quick.png").replace("compare.jsonl", "compare-quick.jsonl")
    seconds = round(time.monotonic() - started, 1)
    out.write({"kind": "summary", "seconds": seconds, "markdown": body})
    plots.plot_compare({k: {**r, "label": r["label"]} for k, r in rows.items()}, searches, out.dir / f"{name}.png",
                       p99_limit=cfg["p99_limit_ms"],
                       title=f"{out.machine['date']} — {out.machine['nproc']} × {out.machine['cpu_model']}, "
                             f"{out.machine['ram_gib']} GiB — {cfg['rooms'] * cfg['clients_per_room']:,} clients")
    if not args.no_publish and not args.quick:
        publish("compare", body)
    print(body)
    print(f"\n(took {seconds:.0f}s; results in {out.dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
