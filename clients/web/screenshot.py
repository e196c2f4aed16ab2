"""Take the README screenshot (docs/screenshot.png): two users in one room, seen by one of them.

    .venv/bin/python clients/web/screenshot.py        # after `make web`; starts its own server

Uses Debian's /usr/bin/chromium through Playwright, a throwaway open-dev-mode server on a free
port and a temporary data directory.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from playwright.async_api import async_playwright, expect  # noqa: E402

from tests.webapp.webtools import CHROMIUM, CHROMIUM_ARGS, build_web, start_server  # noqa: E402

OUT = ROOT / "docs" / "screenshot.png"
ROOM = "team/launch-plan"


async def main() -> None:
    build_web()
    with tempfile.TemporaryDirectory() as tmp:
        server = await start_server(Path(tmp))
        try:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                pages = []
                for name in ("Ann", "Bob"):
                    context = await browser.new_context(viewport={"width": 1200, "height": 640})
                    page = await context.new_page()
                    await page.goto(f"{server.http}/r/{ROOM}?name={name}")
                    await expect(page.locator("#status")).to_have_attribute("data-status", "connected")
                    pages.append(page)
                ann, bob = pages
                await ann.click(".cm-content")
                await ann.keyboard.type("# Launch plan\n\nShip the web app on Friday.\nWrite the release notes by Thursday.\n")
                await expect(bob.locator(".cm-content")).to_contain_text("release notes")
                await bob.click(".cm-content")
                await bob.keyboard.press("Control+End")
                await bob.keyboard.type("Demo room is booked for 3 pm.")
                await ann.fill("#chat-input", "@Bob can you take the demo?")
                await ann.press("#chat-input", "Enter")
                await bob.evaluate("""() => {
                    const view = window.collab.view
                    const at = view.state.doc.toString().indexOf('release notes')
                    view.dispatch({ selection: { anchor: at, head: at + 13 } })
                }""")
                await bob.fill("#chat-input", "Sure! I'll draft these too.")
                await bob.press("#chat-input", "Enter")
                await expect(ann.locator(".chat-message")).to_have_count(2)
                await ann.click(".cm-content")
                await ann.keyboard.press("Control+End")
                await expect(ann.locator(".cm-ySelectionInfo")).to_have_text("Bob")
                OUT.parent.mkdir(exist_ok=True)
                await ann.screenshot(path=str(OUT))
                await browser.close()
        finally:
            await server.stop()
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    if not CHROMIUM.exists():
        sys.exit(f"{CHROMIUM} is missing (apt-get install chromium)")
    asyncio.run(main())
