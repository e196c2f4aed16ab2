"""``collab edit FILE --room R``: mirror one room's text to a local file, so any editor can join.

The simplest editor plugin: the editor edits a plain file; this bridge keeps the file and the
room's ``Y.Text`` equal.

* File → room: the file is polled (size, mtime, inode every ``poll`` seconds; no extra
  dependencies). A change is acted on once the file has stopped changing for one poll (editors
  that write in place are not read half-written). The old and new text are diffed into minimal
  edits (common prefix/suffix, then ``difflib`` on characters) applied as one transaction, so
  concurrent remote edits elsewhere in the text survive.
* Room → file: after a remote change the whole text is written to a temporary file beside the
  target and renamed over it (atomic: an editor never reads a partial file).
* No echo: the bridge remembers the text it last read or wrote; its own writes and its own edits
  are recognised and not sent back.
* At start the room wins: if the file exists with different text and the room is not empty, the
  file's old text is kept in ``FILE.collab-backup``. An empty room is seeded from the file.

Limit: if the editor saves an older buffer just after a remote change was written (the editor
did not reload the file), that save wins for the lines it differs in, as with any external-change
conflict.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import os
import signal
import sys
from bisect import bisect_right
from pathlib import Path
from typing import Any

import pycrdt

from clients.sdk import CollabClient, Room, ServerClosed

Edit = tuple[int, int, str]  # (index, characters to delete, text to insert)


def text_edits(old: str, new: str) -> list[Edit]:
    """Minimal edits turning ``old`` into ``new``, last first (apply them in the order given)."""
    if old == new:
        return []
    prefix = 0
    limit = min(len(old), len(new))
    while prefix < limit and old[prefix] == new[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and old[len(old) - 1 - suffix] == new[len(new) - 1 - suffix]:
        suffix += 1
    a, b = old[prefix:len(old) - suffix], new[prefix:len(new) - suffix]
    edits: list[Edit] = []
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            edits.append((prefix + i1, i2 - i1, b[j1:j2]))
    edits.reverse()
    return edits


def apply_edits(text: pycrdt.Text, edits: list[Edit]) -> None:
    """Apply edits from ``text_edits`` (character indices into the text's current content, last
    first) to a Y.Text, in one transaction."""
    if not edits:
        return
    assert text.doc is not None
    current = str(text)
    with text.doc.transaction():
        for index, delete, insert in edits:
            # pycrdt indexes text by UTF-8 byte; the edits (and Python) count characters. Edits
            # come last first, so everything before ``index`` is still the original text.
            start = len(current[:index].encode("utf-8"))
            if delete:
                del text[start:start + len(current[index:index + delete].encode("utf-8"))]
            if insert:
                text.insert(start, insert)


def rebase(edits: list[Edit], base: str, current: str) -> list[Edit]:
    """Move edits made against ``base`` onto ``current`` (base plus changes from elsewhere)."""
    if base == current:
        return edits
    blocks = difflib.SequenceMatcher(None, base, current, autojunk=False).get_matching_blocks()
    starts = [block.a for block in blocks]

    def position(index: int) -> int:
        i = bisect_right(starts, index) - 1
        if i >= 0:
            block = blocks[i]
            if index < block.a + block.size or block.size == 0 and index == block.a:
                return block.b + (index - block.a)
            return block.b + block.size  # inside a region changed elsewhere: its end
        return 0

    moved = []
    for index, delete, insert in edits:
        start = position(index)
        end = position(index + delete) if delete else start
        moved.append((start, max(0, end - start), insert))
    moved.sort(key=lambda edit: edit[0], reverse=True)
    return moved


class FileBridge:
    def __init__(self, path: str | os.PathLike[str], room: Room, *, name: str = "text", poll: float = 0.2) -> None:
        self.path = Path(path)
        self.room = room
        self.text = room.doc.get(name, type=pycrdt.Text)
        self.poll = poll
        self.known = ""  # what file and room last agreed on
        self._seen: tuple[int, int, int] | None = None  # stat of the file as we last read or wrote it
        self._candidate: tuple[int, int, int] | None = None
        self._wake = asyncio.Event()
        self._subscription: Any = None

    async def run(self) -> None:
        """Mirror until cancelled."""
        self._start()
        self._subscription = self.room.doc.observe(lambda _event: self._wake.set())
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll)
                self._wake.clear()
                self.sync_once()
        finally:
            with contextlib.suppress(Exception):
                self.room.doc.unobserve(self._subscription)
            self.sync_once(settle=False)  # a save just before we stop still reaches the room

    def _start(self) -> None:
        room_text = str(self.text)
        file_text = self._read()
        if file_text is None:
            self._write(room_text)
        elif not room_text and file_text:
            apply_edits(self.text, text_edits("", file_text))
            self.known = file_text
            self._seen = self._stat()
        elif file_text != room_text:
            backup = self.path.with_name(self.path.name + ".collab-backup")
            backup.write_text(file_text, encoding="utf-8", newline="")
            print(f"collab edit: the room's text replaces {self.path}; the old text is in {backup}", file=sys.stderr)
            self._write(room_text)
        else:
            self.known = file_text
            self._seen = self._stat()

    def sync_once(self, *, settle: bool = True) -> None:
        """One step, synchronous (nothing changes in between): take a file save, or write the room."""
        stat = self._stat()
        if stat is not None and stat != self._seen:
            if settle and stat != self._candidate:
                self._candidate = stat  # act once it has stayed like this for a poll
                return
            disk = self._read()
            if disk is not None and self._stat() == stat:
                self._seen = stat
                self._candidate = None
                if disk != self.known:
                    current = str(self.text)
                    apply_edits(self.text, rebase(text_edits(self.known, disk), self.known, current))
                    self.known = disk
        current = str(self.text)
        if current != self.known:
            self._write(current)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> str | None:
        try:
            with open(self.path, encoding="utf-8", newline="") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _write(self, text: str) -> None:
        tmp = self.path.with_name(f".{self.path.name}.collab-{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        with contextlib.suppress(OSError):
            os.chmod(tmp, self.path.stat().st_mode & 0o7777)
        os.replace(tmp, self.path)
        self.known = text
        self._seen = self._stat()
        self._candidate = None


async def edit(path: str, *, url: str, room: str, token: str | None, name: str = "text", poll: float = 0.2,
               ready: asyncio.Event | None = None) -> None:
    async with CollabClient(url, token, track_undo=False) as client:
        joined = await client.join(room)
        print(f"collab edit: {path} <-> {room} ({name})", file=sys.stderr, flush=True)
        bridge = FileBridge(path, joined, name=name, poll=poll)
        task = asyncio.ensure_future(bridge.run())
        if ready is not None:
            ready.set()
        try:
            await task
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def add_edit_parser(sub: Any) -> None:
    parser = sub.add_parser("edit", help="mirror a room's text to a local file, so any editor can join")
    parser.add_argument("file", help="the file to mirror (created if missing)")
    parser.add_argument("--room", required=True, help="room name")
    parser.add_argument("--url", default=os.environ.get("COLLAB_URL", "ws://127.0.0.1:1234"),
                        help="server websocket URL (env COLLAB_URL, default ws://127.0.0.1:1234)")
    parser.add_argument("--token", default=None, help="access token (default: $COLLAB_TOKEN)")
    parser.add_argument("--name", default="text", help="name of the room's Y.Text (default 'text')")
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between file checks (default 0.2)")
    parser.set_defaults(func=run_edit)


def run_edit(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("COLLAB_TOKEN")

    async def main() -> int:
        task = asyncio.ensure_future(edit(args.file, url=args.url, room=args.room, token=token,
                                          name=args.name, poll=args.poll))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            return 0
        except ServerClosed as exc:
            print(f"collab edit: {exc}", file=sys.stderr)
            return 1
        return 0

    return asyncio.run(main())
