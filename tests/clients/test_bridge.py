"""``collab edit``: a file and a room's text kept equal, with stock Yjs clients on the other side."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path

import pycrdt
import pytest
from servers import ROOT, wait_until

from clients.bridge import apply_edits, rebase, text_edits

SAMPLES = ["", "a", "hello world", "héllo wörld", "emoji 🌍 and 👩‍👩‍👧 family", "line one\r\nline two\n", "tab\tz"]


def apply_plain(text: str, edits) -> str:
    for index, delete, insert in edits:
        text = text[:index] + insert + text[index + delete:]
    return text


@pytest.mark.parametrize("old", SAMPLES)
@pytest.mark.parametrize("new", SAMPLES)
def test_edits_turn_the_old_text_into_the_new_one_in_a_ytext(old, new):
    doc = pycrdt.Doc()
    text = doc.get("text", type=pycrdt.Text)
    text += old
    edits = text_edits(old, new)
    assert apply_plain(old, edits) == new
    apply_edits(text, edits)
    assert str(text) == new


def test_edits_are_minimal():
    assert text_edits("hello world", "hello brave world") == [(6, 0, "brave ")]
    assert text_edits("abcdef", "abXdef") == [(2, 1, "X")]
    assert text_edits("same", "same") == []
    rng = random.Random(7)
    base = "".join(rng.choice("abc \n") for _ in range(2000))
    changed = base[:500] + "INSERTED" + base[500:1500] + base[1510:]
    edits = text_edits(base, changed)
    assert sum(len(insert) + delete for _, delete, insert in edits) == len("INSERTED") + 10


def test_a_save_is_rebased_onto_remote_changes_it_has_not_seen():
    base = "one two three"
    mine = "one 2 three"  # the file, edited from base
    theirs = "zero one two three four"  # the room meanwhile
    edits = rebase(text_edits(base, mine), base, theirs)
    assert apply_plain(theirs, edits) == "zero one 2 three four"


async def test_the_file_and_a_yjs_client_see_each_others_edits(server, node, tmp_path):
    yjs = await node.client(server.url, "notes/bridge")
    await yjs.insert(0, "hello\n")
    path = tmp_path / "notes.txt"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "collab", "edit", str(path), "--room", "notes/bridge", "--url", server.url,
        "--poll", "0.05", cwd=str(ROOT), stderr=asyncio.subprocess.PIPE)
    try:
        await wait_until(lambda: _read(path) == "hello\n", what="room text mirrored to the file")

        _save(path, "hello world\nsecond line\n")  # an editor saving the whole file
        await yjs.wait_text("hello world\nsecond line\n")

        await yjs.insert(0, "> ")
        await wait_until(lambda: _read(path) == "> hello world\nsecond line\n", what="remote edit in the file")

        _append(path, "ünïcode 🌍 ok\n")  # an editor writing in place
        await yjs.wait_text("> hello world\nsecond line\nünïcode 🌍 ok\n")
        await yjs.insert(len("> hello world\nsecond line\nünïcode 🌍".encode("utf-16-le")) // 2, "!")
        await wait_until(lambda: _read(path) == "> hello world\nsecond line\nünïcode 🌍! ok\n",
                         what="a remote edit after an astral character lands in the right place")
        assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave nothing behind
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, stderr.decode()


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def _save(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".editor-tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
