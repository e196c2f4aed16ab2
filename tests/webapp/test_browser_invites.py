"""Invites in the browser, with a server secret: the owner invites, a viewer cannot edit.

The owner's token comes from "the host app" (here: ``issue_token``), handed to the app as
``/?token=…``; the invite link mints tokens for its room and role.
"""

from __future__ import annotations

import pytest
import pytest_asyncio
from playwright.async_api import Page, expect

from collab.auth import issue_token

from .webtools import SECRET, TIMEOUT, start_server

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tmp_path_factory, web_dist):
    srv = await start_server(tmp_path_factory.mktemp("webapp-secret"), secret=SECRET)
    yield srv
    await srv.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def pages(pages_factory, server):
    return pages_factory(server.http)


async def create_invite(page: Page, role: str) -> str:
    await page.click("#invite")
    await page.select_option("#invite-role", role)
    await page.click("#invite-create")
    link = page.locator("#invite-link")
    await page.wait_for_function("document.getElementById('invite-link').value.includes('/invite/')", timeout=TIMEOUT)
    url = await link.input_value()
    await page.click("#invite-form button[value=cancel]")
    return url


async def test_invite_link_as_viewer_cannot_edit_and_as_editor_can(pages, artifacts):
    token = issue_token(SECRET, user="olivia", name="Olivia", rooms=["proj/*"], role="editor")
    owner = await pages.open(f"/?token={token}")
    await expect(owner.locator("#me-name")).to_have_text("Olivia", timeout=TIMEOUT)
    assert "token=" not in owner.url  # the token leaves the address bar

    # Olivia creates the room from the session panel: she is its owner.
    await owner.fill("#create-name", "proj/spec")
    await owner.press("#create-name", "Enter")
    await owner.wait_for_url("**/r/proj/spec", timeout=TIMEOUT)
    await expect(owner.locator("#status")).to_have_attribute("data-status", "connected", timeout=TIMEOUT)
    await expect(owner.locator("#me .role")).to_have_text("owner")
    await owner.click(".cm-content")
    await owner.keyboard.type("Spec v1\n")

    viewer_link = await create_invite(owner, "viewer")
    editor_link = await create_invite(owner, "editor")

    # Carol opens the viewer link in a third context: the app asks her name, then opens the room.
    carol = await pages.open(viewer_link.replace(pages.base, ""))
    await expect(carol.locator("#login-text")).to_contain_text("as viewer", timeout=TIMEOUT)
    await carol.fill("#login-name", "Carol")
    await carol.press("#login-name", "Enter")
    await carol.wait_for_url("**/r/proj/spec", timeout=TIMEOUT)
    await expect(carol.locator("#status")).to_have_attribute("data-status", "connected", timeout=TIMEOUT)
    await expect(carol.locator(".cm-content")).to_contain_text("Spec v1", timeout=TIMEOUT)
    await expect(carol.locator("#readonly-badge")).to_be_visible()
    await expect(carol.locator("#me .role")).to_have_text("viewer")
    await expect(carol.locator("#me")).to_have_text("CACarolviewer")  # no dev-mode "switch user" with tokens
    await expect(carol.locator('#collaborators li[data-name="Olivia"] .role')).to_have_text("owner", timeout=TIMEOUT)
    await expect(carol.locator("#invite")).to_be_hidden()
    await expect(carol.locator("#undo")).to_be_disabled()
    await expect(owner.locator('#collaborators li[data-name="Carol"] .role')).to_have_text("viewer", timeout=TIMEOUT)

    # Typing does nothing in the read-only editor...
    await carol.click(".cm-content")
    await carol.keyboard.type("typed by Carol")
    assert "typed by Carol" not in await carol.evaluate("window.collab.ytext.toString()")

    # ...and an edit forced past the UI is refused by the server. Carol's chat message, sent after
    # it on the same socket, proves the server has handled the edit by the time Olivia sees it.
    await carol.evaluate("window.collab.ytext.insert(0, 'forced by Carol ')")
    await carol.fill("#chat-input", "viewers may still comment")
    await carol.press("#chat-input", "Enter")
    await expect(owner.locator(".chat-message", has_text="viewers may still comment")).to_be_visible(timeout=TIMEOUT)
    assert "forced by Carol" not in await owner.evaluate("window.collab.ytext.toString()")

    # Dave opens the editor link (name given in the link) and can edit.
    dave = await pages.open(editor_link.replace(pages.base, "") + "?name=Dave")
    await expect(dave.locator("#status")).to_have_attribute("data-status", "connected", timeout=TIMEOUT)
    await expect(dave.locator("#readonly-badge")).to_be_hidden()
    await dave.click(".cm-content")
    await dave.keyboard.press("Control+End")
    await dave.keyboard.type("Dave's addition")
    await expect(owner.locator(".cm-content")).to_contain_text("Dave's addition", timeout=TIMEOUT)

    await owner.screenshot(path=artifacts / "invites-owner.png")
    await carol.screenshot(path=artifacts / "invites-viewer.png")
