"""Every hostile input closes only its own connection, with a documented code; the room, its
storage and the other clients carry on undisturbed."""

from __future__ import annotations

import asyncio
import socket

import pycrdt
import pytest
from websockets.asyncio.client import connect

from clients import YClient
from collab import protocol
from servers import wait_until


def nested_any_update(depth: int) -> bytes:
    """A structurally valid update whose Map value is `depth` nested Any arrays."""
    out = bytearray(b"\x01\x01")  # one client, one struct
    protocol.write_var_uint(out, 424242)  # client
    out += b"\x00"  # clock
    out.append(0x28)  # info: parentSub present (0x20) | content Any (8)
    out.append(1)  # parent is a root type
    protocol.write_var_string(out, "map")
    protocol.write_var_string(out, "key")
    out.append(1)  # one Any value
    out += b"\x75\x01" * depth + b"\x7e"  # `depth` arrays of one element each, then null
    out.append(0)  # empty delete set
    return bytes(out)


HOSTILE = {
    "garbage": (b"\xff\xfe\xfd\xfc", 4400),
    "unknown type": (b"\x09\x00", 4400),
    "overlong varint": (b"\x00\x02" + b"\xff" * 12 + b"\x01", 4400),
    "length beyond frame": (b"\x00\x02\xff\xff\xff\x7f\x00", 4400),
    "truncated update": (protocol.encode_update(bytes.fromhex("0101bcdc8aa9f48cc904000401047465787402686900"))[:-4], 4400),
    "deep nesting": (protocol.encode_update(nested_any_update(30_000)), 4400),
    "trailing bytes": (protocol.encode_update(b"\x00\x00") + b"\x00", 4400),
    "awareness not json": (protocol.encode_awareness([protocol.AwarenessEntry(7, 1, "{nope")]), 4400),
    "empty frame": (b"", 4400),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_frame_closes_only_that_connection(server, node, case):
    frame, code = HOSTILE[case]
    good = await node.client(server.url, "target")
    await good.insert(0, "keep me")
    async with YClient(server.url, "target") as bad:
        await bad.send_raw(frame)
        got_code, reason = await bad.wait_closed(timeout=5)
    assert got_code == code, (case, got_code, reason)
    assert reason and "Traceback" not in reason
    # The room, its storage and the good client are intact and still editing.
    await good.append(" and me")
    async with YClient(server.url, "target") as fresh:
        await fresh.wait_for(lambda: fresh.text() == "keep me and me", timeout=5, what="room intact")
    assert (await good.status())["connected"]
    assert (await server.get("/healthz")).status_code == 200


async def test_text_frame_is_refused_with_4400(server):
    async with YClient(server.url, "t") as bad:
        await bad.send_raw("hello")
        assert (await bad.wait_closed())[0] == 4400


async def test_oversized_frame_is_refused_with_4413(server_factory):
    srv = await server_factory(max_frame_bytes=64 * 1024)
    async with YClient(srv.url, "big") as bad:
        doc = pycrdt.Doc()
        doc.get("text", type=pycrdt.Text).insert(0, "x" * 100_000)
        await bad.send_raw(protocol.encode_update(doc.get_update()))
        assert (await bad.wait_closed())[0] == 4413
    async with YClient(srv.url, "big") as fresh:
        assert fresh.text() == ""


async def test_deeply_nested_update_cannot_crash_the_server(server, node):
    """pycrdt (yrs) overflows its native stack on ~26k nested arrays and the process dies; the
    validator must stop it before pycrdt sees it."""
    watcher = await node.client(server.url, "deep")
    for depth in (30_000, 100_000):
        async with YClient(server.url, "deep") as bad:
            await bad.send_raw(protocol.encode_update(nested_any_update(depth)))
            assert (await bad.wait_closed())[0] == 4400
    assert server.proc.returncode is None
    await watcher.insert(0, "alive")
    async with YClient(server.url, "deep") as fresh:
        await fresh.wait_for(lambda: fresh.text() == "alive", timeout=5, what="server alive")


async def test_flood_is_closed_with_1013_while_another_client_edits_undisturbed(server_factory, node):
    srv = await server_factory(rate_limit=50, rate_burst=100)
    good = await node.client(srv.url, "flood")
    async with YClient(srv.url, "flood") as bad:
        typing = asyncio.create_task(good.type_burst(40, interval_ms=20))
        frame = protocol.encode_awareness([])  # cheap, valid messages
        for _ in range(2000):
            try:
                await bad.send_raw(frame)
            except Exception:
                break
        code, reason = await bad.wait_closed(timeout=5)
        assert code == 1013 and "rate" in reason
        typed = await typing
    async with YClient(srv.url, "flood") as fresh:
        await fresh.wait_for(lambda: fresh.text() == typed, timeout=5, what="good client's edits")


async def test_client_that_stops_reading_is_closed_and_memory_stays_bounded(server_factory, node):
    srv = await server_factory(outbox_max_bytes=256 * 1024, max_frame_bytes=128 * 1024)
    # A raw client that never reads: a tiny kernel receive buffer, and no reader task.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", srv.port))
    slow = await connect(srv.url + "/slow", sock=sock, max_size=None, compression=None, ping_interval=None,
                         max_queue=1)
    writer = await node.client(srv.url, "slow")
    chunk = "y" * 60_000
    for _ in range(500):  # up to ~30 MB relayed towards a reader that never reads
        await writer.append(chunk)
        if await srv.metric("collab_closes_total", '{code="1013"}') >= 1:
            break
    await wait_until(lambda: _closed_1013(srv), timeout=15, what="slow consumer closed")
    rss = _rss_mb(srv.pid)
    assert rss < 400, f"server RSS {rss} MB"
    await slow.close()
    # The writer is unaffected.
    assert (await writer.status())["connected"]


async def _closed_1013(srv):
    return await srv.metric("collab_closes_total", '{code="1013"}') >= 1


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def test_spoofed_awareness_client_id_is_dropped(server, node):
    victim = await node.client(server.url, "spoof", params={"name": "Victim"}, awareness={"user": {"name": "Victim"}})
    watcher = await node.client(server.url, "spoof")
    vid = victim.id
    await watcher.wait_for(lambda: _state_of(watcher, vid), timeout=5, what="victim presence")
    async with YClient(server.url, "spoof") as attacker:
        forged = protocol.AwarenessEntry(vid, 999, '{"user":{"name":"Mallory"}}')
        removal = protocol.AwarenessEntry(vid, 1000, "null")
        await attacker.send_raw(protocol.encode_awareness([forged]))
        await attacker.send_raw(protocol.encode_awareness([removal]))
        await wait_until(lambda: _metric_at_least(server, "collab_awareness_rejected_total", 2), timeout=5,
                         what="spoof counted")
    assert (await watcher.awareness())[vid]["user"]["name"] == "Victim"  # stamped by the server, not forged


async def _state_of(client, cid):
    return cid in await client.awareness()


async def _metric_at_least(srv, name, n):
    return await srv.metric(name) >= n


@pytest.mark.parametrize("path,code", [("/" + "r" * 600, 4400), ("/api/x", 4400), ("/_internal", 4400)])
async def test_bad_room_paths_are_refused(server, path, code):
    async with connect(server.url + path, ping_interval=None) as ws:
        with pytest.raises(Exception):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == code
