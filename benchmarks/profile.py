"""Sampling profiles of a server process during a benchmark (py-spy; needs root or ptrace rights).

    collab bench load --server collab --rate 2/s --duration 20s --profile

writes ``<name>-profile.txt`` (the functions that dominate: self and inclusive time, by
file:line and by function) and ``<name>-profile.svg`` (a flame graph) next to the results.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Profiler:
    """``async with Profiler(pid, seconds, out_stem):`` records while the body runs."""

    def __init__(self, pid: int, seconds: float, out_stem: Path, rate: int = 250) -> None:
        self.pid = pid
        self.seconds = max(1, int(round(seconds)))
        self.out_stem = Path(out_stem)
        self.rate = rate
        self.raw = self.out_stem.with_name(self.out_stem.name + "-profile.raw")
        self.svg = self.out_stem.with_name(self.out_stem.name + "-profile.svg")
        self.txt = self.out_stem.with_name(self.out_stem.name + "-profile.txt")
        self._procs: list[asyncio.subprocess.Process] = []
        self.error: str | None = None

    async def __aenter__(self) -> Profiler:
        exe = py_spy()
        if exe is None:
            self.error = "py-spy is not installed (pip install py-spy)"
            return self
        # --gil: sample only the thread holding the GIL, i.e. where the Python process spends CPU
        # (an asyncio server is bound by that one thread; SQLite's own thread shows when it holds it)
        common = ["record", "-p", str(self.pid), "-d", str(self.seconds), "-r", str(self.rate), "--nonblocking", "--gil"]
        for fmt, path in (("raw", self.raw), ("flamegraph", self.svg)):
            self._procs.append(await asyncio.create_subprocess_exec(
                exe, *common, "-f", fmt, "-o", str(path),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in self._procs:
            try:
                _out, err = await asyncio.wait_for(proc.communicate(), self.seconds + 30)
            except TimeoutError:
                proc.kill()
                continue
            if proc.returncode != 0 and self.error is None:
                self.error = (err or b"").decode(errors="replace").strip()[-300:]
        if self.raw.exists():
            self.txt.write_text(summarize(self.raw))
            self.raw.unlink()


def summarize(raw: Path, top: int = 30) -> str:
    """Self and inclusive sample shares per frame (file:line) and per function, from py-spy's
    raw (collapsed-stack) output."""
    self_line: Counter[str] = Counter()
    incl_line: Counter[str] = Counter()
    self_func: Counter[str] = Counter()
    incl_func: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        seen_l: set[str] = set()
        seen_f: set[str] = set()
        for frame in frames:
            func = frame.rsplit(":", 1)[0] + ")" if ":" in frame else frame
            if frame not in seen_l:
                incl_line[frame] += n
                seen_l.add(frame)
            if func not in seen_f:
                incl_func[func] += n
                seen_f.add(func)
        self_line[frames[-1]] += n
        leaf = frames[-1]
        self_func[leaf.rsplit(":", 1)[0] + ")" if ":" in leaf else leaf] += n
    if not total:
        return "no samples\n"

    def block(title: str, counter: Counter[str]) -> list[str]:
        return [title] + [f"{100 * c / total:6.1f}%  {name}" for name, c in counter.most_common(top)] + [""]

    return "\n".join([f"{total} samples of the thread holding the GIL", ""]
                     + block("== self time by function", self_func)
                     + block("== self time by line", self_line)
                     + block("== inclusive time by function", incl_func))

