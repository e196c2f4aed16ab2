"""GET /api/rtc/config: ICE servers with TURN REST credentials; settings read from the hub."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from types import SimpleNamespace

import httpx
import pytest

from clients.rtc import fetch_ice_servers, ice_servers_from_config
from collab.auth import issue_token
from servers import InProcessServer
from signaling import SignalingSettings, ice_config, turn_credentials
from sigtools import tune

SECRET = "signaling-secret-0123456789-abcdefghij"


async def get(srv, path: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient() as http:
        return await http.get(srv.http + path, headers=headers, timeout=5)


async def test_default_config_has_no_ice_servers(sig_server):
    r = await get(sig_server, "/api/rtc/config")
    assert r.status_code == 200
    assert r.json() == {"iceServers": []}
    assert r.headers["cache-control"] == "no-store"


async def test_turn_rest_credentials_for_the_token_user(tmp_path):
    async with InProcessServer(tmp_path, secret=SECRET) as srv:
        tune(srv, stun_urls=("stun:stun.example.test:3478",),
             turn_urls=("turn:turn.example.test:3478?transport=udp", "turns:turn.example.test:5349"),
             turn_secret="coturn-shared-secret", turn_ttl=600)
        assert (await get(srv, "/api/rtc/config")).status_code == 401
        assert (await get(srv, "/api/rtc/config", "bad")).status_code == 401
        before = int(time.time())
        body = (await get(srv, "/api/rtc/config", issue_token(SECRET, user="alice", role="viewer"))).json()
        # also as ?token=
        assert (await get(srv, "/api/rtc/config?token=" + issue_token(SECRET, user="x"))).status_code == 200
        fetched = await fetch_ice_servers(srv.http, issue_token(SECRET, user="carol"))
        assert fetched[1].username.endswith(":carol") and fetched[0].urls == ["stun:stun.example.test:3478"]
    stun, turn = body["iceServers"]
    assert stun == {"urls": ["stun:stun.example.test:3478"]}
    assert turn["urls"] == ["turn:turn.example.test:3478?transport=udp", "turns:turn.example.test:5349"]
    expiry, user = turn["username"].split(":")
    assert user == "alice" and before + 600 <= int(expiry) <= int(time.time()) + 600
    expected = base64.b64encode(hmac.new(b"coturn-shared-secret", turn["username"].encode(), hashlib.sha1).digest())
    assert turn["credential"] == expected.decode()
    assert body["ttl"] == 600 and body["expiresAt"] == int(expiry)
    servers = ice_servers_from_config(body)
    assert servers[1].username == turn["username"] and servers[1].credential == turn["credential"]


def test_turn_credentials_known_vector():
    # coturn's scheme: username "<expiry>:<user>", password base64(HMAC-SHA1(secret, username))
    username, credential, expiry = turn_credentials("north", "bob", 3600, now=1_700_000_000)
    assert (username, expiry) == ("1700003600:bob", 1_700_003_600)
    assert credential == base64.b64encode(hmac.new(b"north", b"1700003600:bob", hashlib.sha1).digest()).decode()
    # a ':' in a user id cannot forge the expiry part
    assert turn_credentials("s", "a:b", 1, now=0)[0] == "1:a_b"


def test_turn_urls_without_secret_are_returned_bare():
    cfg = SignalingSettings(turn_urls=("turn:t.test",))
    assert ice_config(cfg, "u") == {"iceServers": [{"urls": ["turn:t.test"]}]}


def test_settings_are_read_from_hub_settings_by_name():
    s = SimpleNamespace(signaling_max_topics=5, signaling_max_message_bytes=2048, signaling_rate=3.5,
                        stun_urls="stun:a.test, stun:b.test", turn_urls="", turn_secret=None, turn_ttl="120",
                        secret="x" * 32, max_connections=7)
    cfg = SignalingSettings.from_settings(s)
    assert (cfg.max_topics, cfg.max_message_bytes, cfg.rate, cfg.turn_ttl) == (5, 2048, 3.5, 120)
    assert cfg.stun_urls == ("stun:a.test", "stun:b.test") and cfg.turn_urls == ()
    assert cfg.max_connections == 7 and cfg.secret == "x" * 32
    assert SignalingSettings.from_settings(SimpleNamespace()) == SignalingSettings()
    with pytest.raises(ValueError, match="stun"):
        SignalingSettings.from_settings(SimpleNamespace(stun_urls="http://nope"))
    with pytest.raises(ValueError, match="positive"):
        SignalingSettings.from_settings(SimpleNamespace(signaling_rate=0))
