"""Helpers for the web app's tests: build the app, drive Debian's Chromium, start servers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from servers import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "clients" / "web"
ARTIFACTS = ROOT / "test-artifacts" / "webapp"
CHROMIUM = Path(os.environ.get("COLLAB_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-extensions", "--disable-default-apps",
]
SECRET = "webapp-test-secret-0123456789abcdefghij"
TIMEOUT = 10_000  # ms, for every wait on the browser


def _newest(paths: list[Path]) -> float:
    return max(p.stat().st_mtime for p in paths if p.exists())


def build_web() -> Path:
    """``clients/web/dist``, rebuilt if any source is newer than the build (as ``make web`` does)."""
    index = WEB / "dist" / "index.html"
    sources = [WEB / "package.json", WEB / "package-lock.json", WEB / "build.mjs", *(WEB / "src").iterdir()]
    stamp = WEB / "node_modules" / ".stamp-collab-installed"
    if not stamp.exists() or stamp.stat().st_mtime < _newest([WEB / "package.json", WEB / "package-lock.json"]):
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=WEB, check=True)
        stamp.touch()
    if not index.exists() or index.stat().st_mtime < _newest(sources):
        subprocess.run(["node", "build.mjs"], cwd=WEB, check=True)
    return WEB / "dist"


async def start_server(tmp: Path, **settings) -> ServerProcess:
    return await ServerProcess(tmp, **settings).start()


class Pages:
    """Browser contexts (one per user) that record page errors; closed at the end of a test."""

    def __init__(self, browser, base: str) -> None:
        self.browser = browser
        self.base = base
        self.contexts = []
        self.errors: list[str] = []

    async def open(self, path: str, *, viewport=(1280, 720)):
        context = await self.browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        await page.goto(self.base + path)
        return page

    async def close(self) -> None:
        for context in self.contexts:
            await context.close()
