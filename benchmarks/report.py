"""Where results go: JSON lines, the machine description, and markdown sections.

Results live in ``benchmarks/results/``: one ``<name>.jsonl`` per benchmark (rewritten by each run:
every line is one JSON object, the first is the run header with the machine), ``<name>.png`` plots,
and ``latest.md`` — the human-readable tables, one section per target (``bench``, ``compare``),
each replaced on its own so ``make bench`` does not erase ``make bench-compare``'s table.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import psutil

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
LATEST_MD = RESULTS_DIR / "latest.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command(*argv: str) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _cpu_pressure() -> float | None:
    from benchmarks.servers import cpu_pressure

    return cpu_pressure()


def machine_info() -> dict[str, Any]:
    commit = _command("git", "rev-parse", "--short", "HEAD")
    dirty = _command("git", "status", "--porcelain", "--untracked-files=no")
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "node": _command("node", "--version"),
        "pycrdt": _version("pycrdt"),
        "pycrdt_websocket": _version("pycrdt-websocket"),
        "pycrdt_store": _version("pycrdt-store"),
        "git_commit": (commit + ("-dirty" if dirty else "")) if commit else None,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "cpu_pressure_pct": _cpu_pressure(),
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
    }


def machine_line(machine: dict[str, Any]) -> str:
    return (f"{machine['date']} · {machine['nproc']} × {machine['cpu_model']} · {machine['ram_gib']} GiB RAM · "
            f"{machine['os']} · Python {machine['python']} · Node {machine['node']} · commit {machine['git_commit']} · "
            f"load average at start {machine.get('loadavg', ['?'])[0]}"
            + (f", CPU pressure {machine['cpu_pressure_pct']}%" if machine.get("cpu_pressure_pct") is not None else "")
            + (f", benchmark processes at nice {machine['nice']}" if machine.get("nice") else ""))


def clean(value: Any) -> Any:
    """JSON-safe copy: infinities/NaN become None, private keys (``_…``) are dropped."""
    if isinstance(value, float):
        return None if math.isinf(value) or math.isnan(value) else value
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class JsonLines:
    """A results file, rewritten per run: header line first, then one line per record."""

    def __init__(self, name: str, out_dir: Path | None = None, header: dict[str, Any] | None = None) -> None:
        self.dir = Path(out_dir or RESULTS_DIR)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{name}.jsonl"
        self._tmp = self.dir / f"{name}.jsonl.tmp"
        self.records: list[dict[str, Any]] = []
        self.write({"kind": "run", "benchmark": name, "machine": machine_info(), **(header or {})})

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        record = clean(record)
        self.records.append(record)
        # write-through (a crashed run keeps what it measured), then atomically replace
        with open(self._tmp, "w") as f:
            for r in self.records:
                f.write(json.dumps(r, separators=(",", ":"), sort_keys=False) + "\n")
        os.replace(self._tmp, self.path)
        return record

    @property
    def machine(self) -> dict[str, Any]:
        return self.records[0]["machine"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def replace_section(path: Path, name: str, body: str, title: str | None = None) -> None:
    """Replace (or append) the block between ``<!-- BEGIN name -->`` and ``<!-- END name -->``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else (f"# {title}\n\n" if title else "")
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


ROOT_README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _relink(markdown: str, prefix: str) -> str:
    """Prefix relative link/image targets (``](x.png)`` -> ``](prefix/x.png)``)."""
    return re.sub(r"\]\((?![a-z]+://|/|#)([^)]+)\)", lambda m: f"]({prefix}/{m.group(1)})", markdown)


def publish(name: str, body: str) -> None:
    """Put a results section into ``results/latest.md``, then refresh the repository README's
    benchmark block (between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``) from it."""
    replace_section(LATEST_MD, name, body, title="Latest benchmark results")
    if not ROOT_README.exists():
        return
    readme = ROOT_README.read_text()
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin:
        return
    latest = LATEST_MD.read_text()
    sections = re.findall(r"<!-- BEGIN [\w-]+ -->\n(.*?)\n<!-- END [\w-]+ -->", latest, re.S)
    block = "\n\n".join(_relink(sec.strip(), "benchmarks/results") for sec in sections)
    block = block.replace("## ", "### ")
    ROOT_README.write_text(readme[:begin + len(README_BEGIN)] + "\n" + block + "\n" + readme[end:])


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def num(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and (math.isinf(value) or math.isnan(value))):
        return "—"
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".strip()
