"""The web app's HTTP side: pages, assets, rooms, owners, invites, dev login (no browser)."""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from servers import InProcessServer

from collab.auth import issue_token

from .webtools import SECRET


def bearer(user: str, *, rooms=("*",), role="editor", name=None) -> dict[str, str]:
    return {"Authorization": "Bearer " + issue_token(SECRET, user=user, name=name, rooms=list(rooms), role=role)}


@pytest.fixture
async def dev(tmp_path, web_dist):
    async with InProcessServer(tmp_path) as srv, httpx.AsyncClient(base_url=srv.http, timeout=5) as client:
        yield srv, client


@pytest.fixture
async def secure(tmp_path, web_dist):
    async with InProcessServer(tmp_path, secret=SECRET) as srv, httpx.AsyncClient(base_url=srv.http, timeout=5) as client:
        yield srv, client


async def test_app_pages_and_assets_are_served_with_cache_headers(dev):
    _, client = dev
    for path in ("/", "/r/team/notes", "/r/a%20b"):
        page = await client.get(path)
        assert page.status_code == 200, path
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-cache"
    html = (await client.get("/")).text
    scripts = [part.split('"')[0] for part in html.split('src="')[1:]]
    styles = [part.split('"')[0] for part in html.split('rel="stylesheet" href="')[1:]]
    assert scripts and styles and all(p.startswith("/static/") for p in scripts + styles)
    js = await client.get(scripts[0])
    assert js.status_code == 200
    assert "javascript" in js.headers["content-type"]
    assert "immutable" in js.headers["cache-control"]
    css = await client.get(styles[0])
    assert css.headers["content-type"].startswith("text/css")
    assert "cdn" not in html.lower() and "https://" not in html  # nothing loaded from elsewhere
    for bad in ("/static/nope.js", "/static/../index.html", "/static/%2e%2e/index.html", "/static/"):
        assert (await client.get(bad)).status_code == 404, bad


async def test_dev_login_and_me_in_open_dev_mode(dev):
    _, client = dev
    login = await client.get("/api/dev/login", params={"name": "Ann"})
    assert login.json() == {"mode": "dev", "user": {"id": "dev:Ann", "name": "Ann", "role": "editor"}}
    assert (await client.get("/api/dev/login")).status_code == 400
    me = await client.get("/api/me", params={"name": "Ann"})
    assert me.json()["user"]["name"] == "Ann"


async def test_dev_mode_invite_redirect_carries_the_role_for_the_ui(dev):
    _, client = dev
    created = await client.post("/api/rooms", params={"name": "Ann"}, json={"name": "demo"})
    assert created.status_code == 201
    invite = await client.post("/api/rooms/demo/invites", params={"name": "Ann"}, json={"role": "viewer"})
    assert invite.status_code == 201
    redirect = await client.get(invite.json()["path"], params={"name": "Bob"})
    assert redirect.status_code == 303
    target = urlsplit(redirect.headers["location"])
    assert target.path == "/r/demo"
    assert parse_qs(target.query) == {"name": ["Bob"], "role": ["viewer"]}


async def test_rooms_need_a_token_and_are_filtered_by_its_patterns(secure):
    _, client = secure
    assert (await client.get("/api/rooms")).status_code == 401
    assert (await client.get("/api/dev/login", params={"name": "x"})).status_code == 404
    me = await client.get("/api/me")
    assert me.status_code == 401 and me.json()["mode"] == "token"

    alice = bearer("alice", rooms=["team/*"])
    created = await client.post("/api/rooms", headers=alice, json={"name": "team/notes"})
    assert created.status_code == 201
    assert created.json() == {"name": "team/notes", "owner": "alice", "role": "owner", "url": "/r/team/notes"}
    assert (await client.post("/api/rooms", headers=alice, json={"name": "team/notes"})).status_code == 409
    assert (await client.post("/api/rooms", headers=alice, json={"name": "other/x"})).status_code == 403
    assert (await client.post("/api/rooms", headers=alice, json={"name": "_hidden"})).status_code == 400
    assert (await client.post("/api/rooms", headers=alice, json={"name": "api/x"})).status_code == 400
    assert (await client.post("/api/rooms", headers=alice, content=b"not json")).status_code == 400
    viewer = bearer("vera", rooms=["*"], role="viewer")
    assert (await client.post("/api/rooms", headers=viewer, json={"name": "team/v"})).status_code == 403
    root = bearer("root", rooms=["*"])
    assert (await client.post("/api/rooms", headers=root, json={"name": "other/x"})).status_code == 201

    listed = (await client.get("/api/rooms", headers=alice)).json()
    assert listed == {"rooms": [{"name": "team/notes", "owner": "alice", "role": "owner"}], "truncated": False}
    everything = (await client.get("/api/rooms", headers=bearer("bob"))).json()["rooms"]
    assert [(r["name"], r["role"]) for r in everything] == [("other/x", "editor"), ("team/notes", "editor")]
    assert [r["name"] for r in (await client.get("/api/rooms", headers=root, params={"prefix": "oth"})).json()["rooms"]] \
        == ["other/x"]


async def test_invites_mint_a_token_for_the_room_and_role(secure):
    srv, client = secure
    owner = bearer("olivia", rooms=["proj/*"])
    await client.post("/api/rooms", headers=owner, json={"name": "proj/spec"})
    viewer = bearer("vera", rooms=["proj/*"], role="viewer")
    assert (await client.post("/api/rooms/proj/spec/invites", headers=viewer, json={"role": "viewer"})).status_code == 403
    assert (await client.post("/api/rooms/proj/spec/invites", headers=owner, json={"role": "owner"})).status_code == 400
    assert (await client.post("/api/rooms/proj/spec/invites", headers=owner,
                              json={"role": "viewer", "expires_in": 10**9})).status_code == 400
    outsider = bearer("eve", rooms=["other/*"])
    assert (await client.post("/api/rooms/proj/spec/invites", headers=outsider, json={})).status_code == 403

    made = await client.post("/api/rooms/proj/spec/invites", headers=owner, json={"role": "viewer", "expires_in": 3600})
    assert made.status_code == 201
    invite = made.json()
    assert invite["role"] == "viewer" and invite["room"] == "proj/spec"
    assert invite["url"] == srv.http + invite["path"]
    assert 3590 < invite["expires_at"] - time.time() <= 3600
    stored = await srv.app.state.store.get_meta("proj/spec", "invite:" + invite["code"])
    assert json.loads(stored)["created_by"] == "olivia"

    info = (await client.get(f"/api/invites/{invite['code']}")).json()
    assert info["room"] == "proj/spec" and info["role"] == "viewer" and not info["expired"]
    landing = await client.get(invite["path"])  # no name yet: the app asks for one
    assert landing.status_code == 200 and landing.headers["content-type"].startswith("text/html")

    redirect = await client.get(invite["path"], params={"name": "Carol"})
    assert redirect.status_code == 303
    target = urlsplit(redirect.headers["location"])
    assert target.path == "/r/proj/spec"
    claims = jwt.decode(parse_qs(target.query)["token"][0], SECRET, algorithms=["HS256"])
    assert claims["rooms"] == ["proj/spec"] and claims["role"] == "viewer" and claims["name"] == "Carol"

    # An editor (not the owner) may invite too.
    editor = bearer("ed", rooms=["proj/*"])
    assert (await client.post("/api/rooms/proj/spec/invites", headers=editor, json={"role": "editor"})).status_code == 201

    # Unknown, malformed and expired invites.
    assert (await client.get("/invite/nope", params={"name": "x"})).status_code == 404
    assert (await client.get("/api/invites/no%00pe")).status_code == 404
    await srv.app.state.store.put_meta("proj/spec", "invite:old", json.dumps(
        {"room": "proj/spec", "role": "editor", "created_by": "olivia", "created_at": 0, "expires_at": 1}).encode())
    await srv.app.state.store.put_meta("_invites", "old", b"proj/spec")
    assert (await client.get("/invite/old", params={"name": "x"})).status_code == 410
    assert (await client.get("/api/invites/old")).json()["expired"] is True
