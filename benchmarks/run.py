"""``make bench``: our server's benchmark suite, against the issue's targets.

    python -m benchmarks.run [--quick]

One ``collab serve`` process (SQLite, ``synchronous=FULL``: durability on; per-connection rate
limit raised so a single replaying client is not throttled — the load clients stay far below it):

1. load   — 1,000 clients in 250 rooms typing 1 update/s each (1,000 updates/s) for 30 s;
2. replay — automerge-paper (259,778 keystrokes), 1 writer + 1 reader, as fast as possible,
            against the rate at which pycrdt alone applies the same trace in-process (measured
            in this run while building the updates); text verified on every client, on a fresh
            client and after a restart;
3. join   — the replayed document, stored update by update: cold (after a restart) and warm;
4. replay — the same trace dealt to 4 concurrent writers (blocks of 100 keystrokes) + 1 reader;
5. replay — seph-blog1 at its recorded pace (×20, pauses capped at 1 s), 1 writer + 2 readers;
6. idle   — 10,000 idle connections in 1,000 rooms on a freshly started server.

Results: ``benchmarks/results/bench.jsonl``, ``bench.png``, ``bench-load.png`` and the ``bench``
section of ``results/latest.md`` (and of the repository README's benchmark block).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from benchmarks import plots
from benchmarks.idle import idle
from benchmarks.join import join_times
from benchmarks.load import LoadRunner, LoadSpec, step_passes
from benchmarks.replay import build_updates, load_trace, reference_rate, replay
from benchmarks.report import JsonLines, machine_line, num, publish, table
from benchmarks.servers import COLLAB_UNLIMITED, CollabServer, raise_fd_limit, set_priority
from benchmarks.stats import fmt_ms

FULL = {
    "load_rooms": 250, "load_clients_per_room": 4, "load_rate": 1.0, "load_duration": 30.0,
    "replay_limit": None, "multi_writers": 4, "multi_limit": None,
    "paced_limit": 4000, "paced_speed": 20.0,
    "idle_connections": 10_000, "join_warm": 5, "join_cold": 3,
}
QUICK = {
    "load_rooms": 50, "load_clients_per_room": 4, "load_rate": 1.0, "load_duration": 5.0,
    "replay_limit": 10_000, "multi_writers": 3, "multi_limit": 6_000,
    "paced_limit": 300, "paced_speed": 20.0,
    "idle_connections": 1_000, "join_warm": 3, "join_cold": 1,
}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def run_suite(cfg: dict[str, Any], out: JsonLines, name: str = "bench") -> dict[str, Any]:
    summary: dict[str, Any] = {"kind": "summary"}
    server = CollabServer(**COLLAB_UNLIMITED)
    await server.start()
    try:
        # 1. load
        log(f"== load: {cfg['load_rooms'] * cfg['load_clients_per_room']:,} clients, "
            f"{cfg['load_rate']:g} updates/s each, {cfg['load_duration']:g}s")
        spec = LoadSpec(url=server.url, rooms=cfg["load_rooms"], clients_per_room=cfg["load_clients_per_room"])
        async with LoadRunner(spec, server_pid=server.pid, server_label="collab") as runner:
            out.write({"kind": "connect", **runner.connect_result})
            step = await runner.step(cfg["load_rate"] * spec.senders, cfg["load_duration"], label="fixed")
            ok, why = step_passes(step)
            step["passed"], step["verdict"] = ok, why
            out.write(step)
            summary["connect"] = runner.connect_result
        summary["load"] = step
        plots.plot_load(step, out.dir / f"{name}-load.png")

        # 2. replay, one writer, as fast as possible
        trace = load_trace("automerge-paper")
        log(f"== replay automerge-paper, 1 writer, max speed (building {cfg['replay_limit'] or len(trace['txns']):,} updates…)")
        built = build_updates(trace, writers=1, limit=cfg["replay_limit"], log=log)
        reference_rate(trace, built, cfg["replay_limit"])
        log(f"  pycrdt alone: {built.inprocess_txns_per_s:,.0f} txns/s applying the trace in-process, "
            f"{built.apply_updates_per_s:,.0f} updates/s applying the prebuilt updates")
        single = await replay(server.url, built, writers=1, readers=1, pace="max", restart=server.restart, log=log)
        out.write(single)
        summary["replay_single"] = single

        # 3. join the replayed document
        log("== join the replayed document (stored update by update): cold and warm")
        joined = await join_times(server.url, single["room"], server=server, expected=built.end_content,
                                  warm=cfg["join_warm"], cold=cfg["join_cold"], log=log)
        out.write(joined)
        summary["join"] = joined
        del built

        # 4. several concurrent writers
        log(f"== replay automerge-paper, {cfg['multi_writers']} concurrent writers, max speed")
        built_multi = build_updates(trace, writers=cfg["multi_writers"], limit=cfg["multi_limit"], log=log)
        multi = await replay(server.url, built_multi, writers=cfg["multi_writers"], readers=1, pace="max", log=log)
        multi["pycrdt_inprocess_txns_per_s"] = single["pycrdt_inprocess_txns_per_s"]
        out.write(multi)
        summary["replay_multi"] = multi
        del built_multi, trace

        # 5. recorded pace
        blog = load_trace("seph-blog1")
        log(f"== replay seph-blog1 at recorded pace ×{cfg['paced_speed']:g}, first {cfg['paced_limit']:,} transactions")
        built_blog = build_updates(blog, writers=1, limit=cfg["paced_limit"], log=log)
        paced = await replay(server.url, built_blog, writers=1, readers=2, pace="recorded",
                             speed=cfg["paced_speed"], max_gap=1.0, log=log)
        out.write(paced)
        summary["replay_paced"] = paced
        del built_blog, blog

        # 6. idle memory, on a fresh process
        log(f"== idle: {cfg['idle_connections']:,} connections on a freshly started server")
        await server.restart()
        idled = await idle(server.url, server.pid, connections=cfg["idle_connections"], log=log)
        out.write(idled)
        summary["idle"] = idled
    finally:
        await server.stop()
        server.cleanup()
    return summary


def render(summary: dict[str, Any], machine: dict[str, Any], quick: bool) -> str:
    load = summary["load"]
    lat = load["latency_ms"]
    conn = summary["connect"]
    single = summary["replay_single"]
    multi = summary["replay_multi"]
    paced = summary["replay_paced"]
    join = summary["join"]
    idle_r = summary["idle"]
    ref = single.get("pycrdt_inprocess_txns_per_s")
    ratio = single.get("ratio_to_inprocess")
    srv = load["server_process"]

    def replay_row(r: dict[str, Any], what: str) -> list[Any]:
        p = r["latency_ms"]
        rate = f"{num(r.get('updates_per_s'))} updates/s" if r.get("updates_per_s") else "incomplete"
        if r["pace"] == "max" and ref and r.get("updates_per_s"):
            rate += f" = {r['updates_per_s'] / ref:.0%} of pycrdt in-process"
        checks = (f"text ok on {r['verified_clients']}/{r['clients']} clients, fresh client "
                  f"{'ok' if r['fresh_client_ok'] else 'FAIL'}"
                  + ("" if r.get("after_restart_ok") is None else f", after restart {'ok' if r['after_restart_ok'] else 'FAIL'}"))
        return [what, f"{rate}; latency p50 {fmt_ms(p['p50'])}, p99 {fmt_ms(p['p99'])}; {checks}"]

    rows = [
        [f"load: {load['clients']:,} clients in {load['rooms']} rooms, {load['target_updates_per_s']:,.0f} updates/s for {load['duration_s']:g}s",
         f"in {num(load['updates_in_per_s'])}/s, out {num(load['frames_out_per_s'])} frames/s; latency p50 {fmt_ms(lat['p50'])}, "
         f"p95 {fmt_ms(lat['p95'])}, p99 {fmt_ms(lat['p99'])}, max {fmt_ms(lat['max'])}; undelivered {load['undelivered']}; "
         f"closes {load['errors']['closes'] or 'none'}; server CPU {num(srv['cpu_pct'])}% RSS {num(srv['rss_mb'])} MiB; "
         f"client saturated: {'yes — ' + '; '.join(load['client']['saturation_reasons']) if load['client']['saturated'] else 'no'}"],
        ["connect / initial sync (same clients)",
         f"connect p50 {fmt_ms(conn['connect_ms']['p50'])}, p99 {fmt_ms(conn['connect_ms']['p99'])}; initial sync p50 "
         f"{fmt_ms(conn['initial_sync_ms']['p50'])}, p99 {fmt_ms(conn['initial_sync_ms']['p99'])}; "
         f"{conn['synced']}/{conn['clients']} synced, {num(conn['connections_per_s'])} connections/s"],
        ["pycrdt alone, in-process (the physical limit; best of two passes)",
         f"{num(ref)} txns/s applying the trace; {num(single.get('pycrdt_apply_updates_per_s'))} updates/s applying prebuilt updates"],
        replay_row(single, f"replay {single['trace']} ({single['updates']:,} updates), 1 writer + 1 reader, max speed"),
        replay_row(multi, f"replay {multi['trace']} ({multi['updates']:,} updates), {multi['writers']} writers + 1 reader, max speed"),
        replay_row(paced, f"replay {paced['trace']} ({paced['updates']:,} updates) at recorded pace ×{paced.get('pace_description', '').split('×')[-1]}, 1 writer + 2 readers"),
        [f"idle: {idle_r['opened']:,} connections in {idle_r['rooms']:,} rooms",
         f"{num(idle_r['per_connection_kb'], 1)} KiB per idle connection; {num(idle_r['per_room_kb'], 1)} KiB per loaded room "
         f"(with a {idle_r['doc_chars']}-character document); RSS {idle_r['rss_baseline_mb']} → {idle_r['rss_all_mb']} MiB"],
        [f"join the {single['trace']} document ({num(join['document_bytes'])} bytes)",
         f"warm {fmt_ms(join['warm_ms']['median'])}, cold {fmt_ms(join['cold_ms']['median'])} (cold/warm "
         f"{join.get('cold_over_warm')}×); text {'ok' if join['text_ok'] else 'FAIL'}"],
    ]
    targets = [
        ["replay ≥ 70% of pycrdt in-process", f"{ratio:.0%}" if ratio else "—",
         "met" if ratio and ratio >= 0.7 else "NOT met"],
        ["≤ 30 KB per idle connection", f"{idle_r['per_connection_kb']:.1f} KiB",
         "met" if idle_r["per_connection_kb"] <= 30 else "NOT met"],
        ["cold join ≤ 10× warm join", f"{join.get('cold_over_warm')}×",
         "met" if join.get("cold_over_warm") is not None and join["cold_over_warm"] <= 10 else "NOT met"],
    ]
    return "\n".join([
        "## Our server (`make bench`)" + (" — quick run" if quick else ""),
        "",
        f"Machine: {machine_line(machine)}. Server: `collab serve` (SQLite, synchronous=FULL), one process.",
        "",
        table(["benchmark", "result"], rows),
        "",
        table(["target", "measured", ""], targets),
        "",
        "![make bench](bench.png)",
        "",
        "Raw data: [bench.jsonl](bench.jsonl) (one JSON object per line); load timeline: "
        "[bench-load.png](bench-load.png).",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small version (~1-2 minutes)")
    parser.add_argument("--nice", type=int, default=None,
                        help="run the benchmark, its servers and generators at this nice value (e.g. -10, as root) "
                             "to shield them from other load on a shared machine; recorded in the results")
    parser.add_argument("--no-publish", action="store_true", help="do not update results/latest.md and the README "
                        "(quick runs never do)")
    args = parser.parse_args(argv)
    raise_fd_limit()
    set_priority(args.nice)
    cfg = QUICK if args.quick else FULL
    name = "bench-quick" if args.quick else "bench"
    out = JsonLines(name, header={"config": cfg, "quick": args.quick})
    started = time.monotonic()
    summary = asyncio.run(run_suite(cfg, out, name))
    summary["seconds"] = round(time.monotonic() - started, 1)
    body = render(summary, out.machine, args.quick)
    if args.quick:
        body = (body.replace("bench.png", "bench-quick.png").replace("bench.jsonl", "bench-quick.jsonl")
                .replace("bench-load.png", "bench-quick-load.png"))
    out.write({"kind": "summary", "seconds": summary["seconds"], "markdown": body})
    plots.plot_bench(summary["load"], [summary["replay_single"], summary["replay_multi"], summary["replay_paced"]],
                     summary["idle"], summary["join"], out.dir / f"{name}.png",
                     title=f"collab — {out.machine['date']} — {out.machine['nproc']} × {out.machine['cpu_model']}")
    if not args.no_publish and not args.quick:
        publish("bench", body)
    print(body)
    print(f"\n(took {summary['seconds']:.0f}s; results in {out.dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
