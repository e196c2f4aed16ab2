"""Helpers shared by the signaling tests."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from websockets.asyncio.client import connect

from clients.rtc import SignalingClient
from servers import InProcessServer
from signaling import SignalingService


def signaling_of(srv: InProcessServer) -> SignalingService:
    for service in srv.hub.services:
        if isinstance(service, SignalingService):
            return service
    raise AssertionError("signaling service not registered")


def tune(srv: InProcessServer, **limits) -> SignalingService:
    """Change the service's limits (they are read when a socket connects)."""
    service = signaling_of(srv)
    service.cfg = dataclasses.replace(service.cfg, **limits)
    return service


async def client(srv: InProcessServer, token: str | None = None, query: str = "") -> SignalingClient:
    return await SignalingClient(srv.url + "/signaling" + query, token).connect()


async def raw(srv: InProcessServer, query: str = ""):
    """A bare websocket to /signaling, for frames SignalingClient would never send."""
    return await connect(srv.url + "/signaling" + query, max_size=None)


def publish_of(topic: str, predicate=None):
    def match(message: dict[str, Any]) -> bool:
        return message.get("type") == "publish" and message.get("topic") == topic and (
            predicate is None or predicate(message.get("data")))
    return match


async def expect_error(c: SignalingClient, message: str | None = None, topic: str | None = None,
                       timeout: float = 5.0) -> dict[str, Any]:
    def match(m: dict[str, Any]) -> bool:
        return m.get("type") == "error" and (message is None or m.get("message") == message) and (
            topic is None or m.get("topic") == topic)
    return await c.next(match, timeout=timeout)


def frame(obj: Any) -> str:
    return json.dumps(obj)
