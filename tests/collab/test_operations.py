"""What an operator relies on: settings validation, health/readiness, metrics, room lifecycle."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys

import pytest

from clients import YClient
from collab.settings import SettingsError, load_settings
from servers import wait_until


@pytest.mark.parametrize("args,needle", [
    (["--port", "70000"], "--port"),
    (["--port", "abc"], "--port"),
    (["--log-format", "xml"], "--log-format"),
    (["--secret", "short"], "--secret"),
    (["--max-frame-bytes", "10"], "--max-frame-bytes"),
])
def test_bad_setting_is_one_line_and_exit_2(args, needle, tmp_path):
    done = subprocess.run([sys.executable, "-m", "collab", "serve", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]


def test_flags_beat_environment_beat_defaults():
    s = load_settings({"port": "9000"}, environ={"COLLAB_PORT": "8000", "COLLAB_HOST": "0.0.0.0"})
    assert (s.port, s.host, s.log_level) == (9000, "0.0.0.0", "info")
    with pytest.raises(SettingsError):
        load_settings({}, environ={"COLLAB_RATE_LIMIT": "-1"})


async def test_health_readiness_and_metrics(server, node):
    assert (await server.get("/healthz")).json()["status"] == "ok"
    ready = (await server.get("/readyz")).json()
    assert ready == {"ready": True, "checks": {"storage": "ok", "bus": "ok"}}
    a = await node.client(server.url, "m")
    b = await node.client(server.url, "m")
    await a.insert(0, "count me")
    await b.wait_text("count me")
    text = (await server.get("/metrics")).text
    for name in ("collab_connections 2.0", "collab_rooms_loaded 1.0", "collab_updates_received_total",
                 "collab_updates_relayed_total", "collab_bytes_in_total", "collab_bytes_out_total",
                 "collab_storage_commit_seconds_bucket", "collab_relay_seconds_bucket", "collab_closes_total"):
        assert name in text, name
    assert await server.metric("collab_updates_received_total") >= 1
    assert await server.metric("collab_updates_relayed_total") >= 1


async def test_concurrent_joiners_share_one_room_load(server):
    clients = [YClient(server.url, "crowd") for _ in range(20)]
    await asyncio.gather(*(c.connect() for c in clients))
    assert await server.metric("collab_room_load_seconds_count") == 1
    await asyncio.gather(*(c.close() for c in clients))


async def test_empty_room_unloads_after_grace_and_reloads_intact(server_factory, node):
    srv = await server_factory(room_grace_seconds=0.3)
    a = await node.client(srv.url, "ephemeral")
    await a.insert(0, "kept")
    await a.destroy()
    await wait_until(lambda: _metric_is(srv, "collab_rooms_loaded", 0), timeout=5, what="unload")
    async with YClient(srv.url, "ephemeral") as fresh:
        assert fresh.text() == "kept"
    assert await srv.metric("collab_room_load_seconds_count") == 2


async def _metric_is(srv, name, value):
    return await srv.metric(name) == value


async def test_room_that_fails_to_load_refuses_joiners_with_1013_and_its_data_stays(server_factory, tmp_path):
    srv = await server_factory(data_dir=tmp_path / "f")
    async with YClient(srv.url, "broken") as c:
        c.doc.get("text", type=__import__("pycrdt").Text).insert(0, "precious")
        await wait_until(lambda: _metric_is(srv, "collab_updates_received_total", 1), timeout=5, what="stored")
    await srv.stop()
    db = tmp_path / "f" / "collab.db"
    with sqlite3.connect(db) as conn:  # a corrupt row, as a bad disk or a bad migration could leave
        conn.execute("INSERT INTO recent(room, data, author, ts) VALUES ('broken', x'ffffffff', 'x', 0)")
    before = _rows(db)
    srv2 = await server_factory(data_dir=tmp_path / "f", port=srv.port)
    bad = YClient(srv2.url, "broken")
    with pytest.raises(Exception):
        await bad.connect(timeout=5)
    assert bad.close_code == 1013
    async with YClient(srv2.url, "other-room") as ok:  # the rest of the server is fine
        assert ok.synced.is_set()
    await srv2.stop()
    assert _rows(db) == before  # nothing overwrote the stored document


def _rows(db) -> list:
    """The room's rows in both files: the main file's ``recent`` and the archive's ``updates``."""
    with sqlite3.connect(db) as conn:
        conn.execute("ATTACH DATABASE ? AS archive", (str(db) + ".archive",))
        return conn.execute("SELECT id, data FROM archive.updates WHERE room='broken' UNION "
                            "SELECT id, data FROM recent WHERE room='broken' ORDER BY id").fetchall()
