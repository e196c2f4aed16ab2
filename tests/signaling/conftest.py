"""Fixtures for the signaling tests. Network safety: everything here stays on loopback.

aioice gathers host candidates from every interface unless told otherwise; the autouse fixture
pins it to 127.0.0.1 for every test in this folder (and the Python helper's ``loopback=True``
does the same), and peers are always built with ``RTCConfiguration(iceServers=[])`` so no STUN
server is ever asked. Node WebRTC peers run in a network namespace of their own that only has
``lo`` (see test_ywebrtc_interop.py).
"""

from __future__ import annotations

import aioice.ice
import pytest

from collab.bus import LocalNetwork
from servers import InProcessServer


def _loopback_only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"] if use_ipv4 else []


@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch):
    monkeypatch.setattr(aioice.ice, "get_host_addresses", _loopback_only)


@pytest.fixture
async def sig_server(tmp_path):
    async with InProcessServer(tmp_path) as srv:
        yield srv


@pytest.fixture
async def two_nodes(tmp_path):
    network = LocalNetwork()
    async with InProcessServer(tmp_path, network=network) as a, InProcessServer(tmp_path, network=network) as b:
        yield a, b
