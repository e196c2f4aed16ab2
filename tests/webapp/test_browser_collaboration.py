"""Two users in two browser contexts on one room, through the real app and a real server.

Open dev mode (no --secret): ``/r/<room>?name=Ann`` opens a room as "Ann".
"""

from __future__ import annotations

import pytest
import pytest_asyncio
from playwright.async_api import Page, expect

from .webtools import TIMEOUT, start_server

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tmp_path_factory, web_dist):
    srv = await start_server(tmp_path_factory.mktemp("webapp-dev"))
    yield srv
    await srv.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def pages(pages_factory, server):
    return pages_factory(server.http)


async def join(pages, room: str, name: str) -> Page:
    page = await pages.open(f"/r/{room}?name={name}")
    await expect(page.locator("#status")).to_have_attribute("data-status", "connected", timeout=TIMEOUT)
    await expect(page.locator("#me-name")).to_have_text(name)
    return page


async def doc_text(page: Page) -> str:
    return await page.evaluate("window.collab.ytext.toString()")


async def wait_doc(page: Page, predicate_js: str) -> None:
    await page.wait_for_function(f"(() => {{ const t = window.collab.ytext.toString(); return {predicate_js} }})()",
                                 timeout=TIMEOUT)


async def type_at_end(page: Page, text: str) -> None:
    await page.click(".cm-content")
    await page.keyboard.press("Control+End")
    await page.keyboard.type(text)


async def test_two_users_edit_see_cursors_collaborators_and_chat(pages, artifacts):
    ann = await join(pages, "team/notes", "Ann")
    bob = await join(pages, "team/notes", "Bob")

    # Typing in one editor appears in the other.
    await type_at_end(ann, "Hello from Ann\n")
    await expect(bob.locator(".cm-content")).to_contain_text("Hello from Ann", timeout=TIMEOUT)

    # The other's cursor shows, labelled with their name, in their colour.
    await type_at_end(bob, "Bob was here")
    await expect(ann.locator(".cm-content")).to_contain_text("Bob was here", timeout=TIMEOUT)
    label = ann.locator(".cm-ySelectionInfo")
    await expect(label).to_have_text("Bob", timeout=TIMEOUT)
    assert await label.evaluate("el => getComputedStyle(el).opacity") == "1"

    # The collaborators list shows both, in both windows, with avatars and roles.
    for page in (ann, bob):
        for name in ("Ann", "Bob"):
            item = page.locator(f'#collaborators li[data-name="{name}"]')
            await expect(item).to_be_visible(timeout=TIMEOUT)
            await expect(item.locator(".avatar")).to_have_text(name[:2].upper())
            await expect(item.locator(".role")).to_have_text("editor")

    # Clicking a collaborator jumps to their cursor.
    bob_head = await bob.evaluate("window.collab.view.state.selection.main.head")
    await ann.click('#collaborators li[data-name="Bob"]')
    await ann.wait_for_function(f"window.collab.view.state.selection.main.head === {bob_head}", timeout=TIMEOUT)

    # A chat message sent in one appears in the other; a mention of the reader is highlighted.
    await ann.fill("#chat-input", "Hi @Bob, welcome")
    await ann.press("#chat-input", "Enter")
    message = bob.locator(".chat-message", has_text="welcome")
    await expect(message).to_be_visible(timeout=TIMEOUT)
    await expect(message.locator(".chat-author")).to_have_text("Ann")
    await expect(message.locator(".mention.me")).to_have_text("@Bob")
    await expect(ann.locator(".chat-message", has_text="welcome")).to_be_visible(timeout=TIMEOUT)

    # A message sent with a selection is anchored to it: a marker in the other's editor.
    await bob.evaluate("""() => {
        const view = window.collab.view
        const at = view.state.doc.toString().indexOf('Hello')
        view.dispatch({ selection: { anchor: at, head: at + 5 } })
    }""")
    await bob.fill("#chat-input", "Is this the right greeting?")
    await bob.press("#chat-input", "Enter")
    await expect(ann.locator(".cm-chat-anchor")).to_have_text("Hello", timeout=TIMEOUT)
    await expect(ann.locator(".cm-chat-marker")).to_have_count(1)
    await expect(ann.locator(".chat-message", has_text="right greeting").locator(".chat-quote")).to_contain_text("Hello")

    await ann.screenshot(path=artifacts / "two-users-ann.png")
    await bob.screenshot(path=artifacts / "two-users-bob.png")


async def test_undo_removes_only_that_users_text(pages, artifacts):
    ann = await join(pages, "undo-room", "Ann")
    bob = await join(pages, "undo-room", "Bob")

    await type_at_end(ann, "Ann wrote this. ")
    await wait_doc(bob, "t === 'Ann wrote this. '")
    await type_at_end(bob, "Bob wrote that.")
    await wait_doc(ann, "t === 'Ann wrote this. Bob wrote that.'")

    # Ann's undo (Mod-z: the server's per-user undo) removes her text and keeps Bob's.
    await expect(ann.locator("#undo")).to_be_enabled(timeout=TIMEOUT)
    await ann.click(".cm-content")
    await ann.keyboard.press("Control+z")
    for page in (ann, bob):
        await wait_doc(page, "t === 'Bob wrote that.'")
    await expect(ann.locator("#redo")).to_be_enabled(timeout=TIMEOUT)

    # Redo (button) brings it back; Bob's undo button undoes only Bob's text.
    await ann.click("#redo")
    for page in (ann, bob):
        await wait_doc(page, "t === 'Ann wrote this. Bob wrote that.'")
    await expect(bob.locator("#undo")).to_be_enabled(timeout=TIMEOUT)
    await bob.click("#undo")
    for page in (ann, bob):
        await wait_doc(page, "t === 'Ann wrote this. '")
    await ann.screenshot(path=artifacts / "undo-ann.png")


async def test_offline_edits_merge_on_return(pages):
    ann = await join(pages, "offline-room", "Ann")
    bob = await join(pages, "offline-room", "Bob")
    await type_at_end(ann, "base\n")
    await wait_doc(bob, "t === 'base\\n'")

    await bob.evaluate("window.collab.provider.disconnect()")
    await expect(bob.locator("#status")).to_have_attribute("data-status", "offline", timeout=TIMEOUT)
    await type_at_end(bob, "written offline\n")
    await expect(bob.locator("#status")).to_contain_text("merge on return")
    await type_at_end(ann, "written online\n")
    await wait_doc(ann, "t.includes('written online') && !t.includes('written offline')")

    await bob.evaluate("window.collab.provider.connect()")
    await expect(bob.locator("#status")).to_have_attribute("data-status", "connected", timeout=TIMEOUT)
    for page in (ann, bob):
        await wait_doc(page, "t.includes('written online') && t.includes('written offline')")
    assert await doc_text(ann) == await doc_text(bob)


async def test_dev_login_and_session_panel(pages):
    # A room link without a name asks for one (open dev mode), then opens the room.
    page = await pages.open("/r/panel-room")
    await expect(page.locator("#login")).to_be_visible(timeout=TIMEOUT)
    await page.fill("#login-name", "Dana")
    await page.press("#login-name", "Enter")
    await expect(page.locator("#me-name")).to_have_text("Dana", timeout=TIMEOUT)
    await expect(page.locator("#status")).to_have_attribute("data-status", "connected", timeout=TIMEOUT)

    # Create a room: it opens, and the session panel lists it with Dana as owner.
    await page.fill("#create-name", "dana/plans")
    await page.press("#create-name", "Enter")
    await page.wait_for_url("**/r/dana/plans", timeout=TIMEOUT)
    await expect(page.locator("#room-title")).to_have_text("dana/plans", timeout=TIMEOUT)
    entry = page.locator("#room-list li", has_text="dana/plans")
    await expect(entry).to_be_visible(timeout=TIMEOUT)
    await expect(entry.locator(".role-owner")).to_have_text("owner")
    await expect(page.locator("#me .role")).to_have_text("owner")

    # Join by name; leave goes back home.
    await page.fill("#join-name", "elsewhere")
    await page.press("#join-name", "Enter")
    await page.wait_for_url("**/r/elsewhere", timeout=TIMEOUT)
    await expect(page.locator("#status")).to_have_attribute("data-status", "connected", timeout=TIMEOUT)
    await page.click("#leave")
    await page.wait_for_url(lambda url: url.endswith("/"), timeout=TIMEOUT)
    await expect(page.locator("#welcome")).to_be_visible()


async def test_dev_mode_viewer_link_shows_the_room_read_only(pages):
    # Open dev mode has no tokens: an invite's role travels as ?role=viewer and only the UI enforces
    # it (dev mode lets anyone edit anything, by design). With --secret the server enforces roles.
    page = await pages.open("/r/dev-viewer?name=Vic&role=viewer")
    await expect(page.locator("#status")).to_have_attribute("data-status", "connected", timeout=TIMEOUT)
    await expect(page.locator("#readonly-badge")).to_be_visible()
    await expect(page.locator("#invite")).to_be_hidden()
    assert "role=" not in page.url
    await page.click(".cm-content")
    await page.keyboard.type("nope")
    assert await doc_text(page) == ""
