"""The harness's own wire helpers: prebuilt updates must be exactly what Yjs/yrs would send."""

from __future__ import annotations

import pycrdt
import pytest

from benchmarks import wsraw, ywire
from benchmarks.cli import parse_duration, parse_rate
from benchmarks.replay import byte_patches, pace_schedule
from benchmarks.stats import percentiles


def test_text_appender_bytes_equal_pycrdt_updates():
    doc = pycrdt.Doc(client_id=987654321)
    text = doc.get("text", type=pycrdt.Text)
    captured: list[bytes] = []
    doc.observe(lambda e: captured.append(bytes(e.update)))
    appender = ywire.TextAppender(987654321)
    ours = []
    for piece in ["a", "hello;", "x" * 300, "3ade68b1:12;"]:
        text += piece
        ours.append(appender.append(piece))
    assert [u for u, _ in ours] == captured
    assert [clock for _, clock in ours] == [0, 1, 7, 307]
    assert [ywire.update_id(u) for u in captured] == [(987654321, c) for _, c in ours]


def test_concurrent_appenders_apply_in_any_order():
    a, b = ywire.TextAppender(11), ywire.TextAppender(22)
    ups = [a.append("a1;")[0], b.append("b1;")[0], a.append("a2;")[0], b.append("b2;")[0]]
    one, two = pycrdt.Doc(), pycrdt.Doc()
    for u in ups:
        one.apply_update(u)
    for u in reversed(ups):
        two.apply_update(u)
    t1, t2 = str(one.get("text", type=pycrdt.Text)), str(two.get("text", type=pycrdt.Text))
    assert t1 == t2 and sorted(t1.split(";")) == sorted(["a1", "a2", "b1", "b2", ""])


def test_relayed_update_id_reads_a_sync_update_message():
    update, clock = ywire.TextAppender(300).append("hi")
    message = ywire.update_message(update)
    assert ywire.relayed_update_id(message) == (300, clock)
    assert ywire.relayed_update_id(ywire.STEP1_EMPTY) is None
    assert ywire.sync_payload(message) == (ywire.SYNC_UPDATE, update)


def test_client_frames_are_masked_and_unmask_to_the_payload():
    payload = bytes(range(200)) * 3
    frame = wsraw.client_frame(payload)
    assert frame[0] == 0x82 and frame[1] & 0x80
    length = int.from_bytes(frame[2:4], "big")
    key = frame[4:8]
    assert length == len(payload)
    assert wsraw._mask(frame[8:], key) == payload


def test_byte_patches_convert_code_points_to_utf8_offsets():
    txns = [{"patches": [[0, 0, "aé→b"]]}, {"patches": [[3, 1, "X"]]}, {"patches": [[1, 1, ""]]}]
    patches = byte_patches(txns)
    doc = pycrdt.Doc()
    text = doc.get("text", type=pycrdt.Text)
    for txn in patches:
        for pos, delete, insert in txn:
            if delete:
                del text[pos:pos + delete]
            if insert:
                text.insert(pos, insert)
    assert str(text) == "a→X"


def test_recorded_pace_spreads_same_second_transactions_and_caps_gaps():
    offsets, _ = pace_schedule([0, 0, 0, 1, 100, 100.5], 6, speed=2.0, max_gap=1.0)
    assert offsets == pytest.approx([0, 1 / 6, 2 / 6, 0.5, 1.0, 1.25])
    uniform, how = pace_schedule([0.0] * 10, 10, typing_rate=5)
    assert uniform[1] == pytest.approx(0.2) and "uniform" in how


def test_parsers_and_percentiles():
    assert parse_rate("5/s") == 5 and parse_rate("300/m") == 5 and parse_rate("2.5") == 2.5
    assert parse_duration("60s") == 60 and parse_duration("2m") == 120 and parse_duration("500ms") == 0.5
    p = percentiles([0.001] * 98 + [0.002] * 2, qs=(50, 99))
    assert p["p50"] == 1.0 and p["p99"] == 2.0
    lost = percentiles([0.001] * 98, missing=2, qs=(50, 99))
    assert lost["p99"] == float("inf") and lost["max"] == float("inf")
