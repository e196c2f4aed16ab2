"""Wiring: settings → store, bus, hub, routes. The only place the layers meet."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute

from collab.bus import Bus, BusMessage, LocalBus, LocalNetwork
from collab.hub import Hub
from collab.logs import get_logger
from collab.metrics import Metrics
from collab.services import Service
from collab.settings import Settings
from collab.transport import WebsocketEndpoint, room_name_problem
from storage import Store, is_postgres_url, open_store

log = get_logger("collab.app")


def make_bus(settings: Settings, metrics: Metrics,
             network: LocalNetwork | None = None) -> Callable[[Callable[[BusMessage], None]], Bus]:
    def factory(deliver: Callable[[BusMessage], None]) -> Bus:
        if settings.redis:
            from collab.redisbus import RedisBus

            return RedisBus(settings.redis, settings.node_id, deliver, node_timeout=settings.node_timeout_seconds,
                            heartbeat_seconds=min(1.0, settings.node_timeout_seconds / 4), metrics=metrics)
        return LocalBus(settings.node_id, deliver, network)

    return factory


def default_services(settings: Settings, store: Store) -> list[Service]:
    """The features every server runs, wired here so that the layers never import each other."""
    from presence import PresenceService  # noqa: PLC0415 - services are wired here, imported lazily
    from signaling import SignalingService  # noqa: PLC0415 - services are wired here, imported lazily
    from collab.undo import UndoService  # noqa: PLC0415 - services are wired here, imported lazily
    from collab.webapp import WebAppService  # noqa: PLC0415 - services are wired here, imported lazily
    from collab.chat import ChatService  # noqa: PLC0415 - services are wired here, imported lazily

    return [SignalingService(), PresenceService(), UndoService(), WebAppService(settings, store), ChatService()]


def create_app(settings: Settings, *, store: Store | None = None, network: LocalNetwork | None = None,
               clock: Callable[[], float] = time.monotonic, services: list[Service] | None = None) -> RoomsFirst:
    metrics = Metrics()
    if store is None:
        options: dict[str, Any] = {"synchronous": settings.sqlite_synchronous,
                                   "commit_interval": settings.commit_interval_ms / 1000}
        if not is_postgres_url(settings.store):
            options["writer"] = settings.sqlite_writer
        store = open_store(settings.store, **options)
    services = default_services(settings, store) if services is None else services
    hub = Hub(settings, store, metrics, make_bus(settings, metrics, network), clock=clock, services=services)
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await store.open()
        if settings.dev_mode:
            log.warning("OPEN DEV MODE: no --secret set, anyone who can reach this port can read and edit every room")
        ready = asyncio.Event()
        hub_task = asyncio.create_task(hub.run(ready))
        await ready.wait()
        log.info("serving", host=settings.host, port=settings.port, store=_safe_url(settings.store),
                 bus="redis" if settings.redis else "in-process", node=settings.node_id)
        try:
            yield
        finally:
            log.info("draining")
            try:
                async with asyncio.timeout(settings.drain_seconds):
                    await hub.drain()
            except TimeoutError:
                log.error("drain timed out; some rooms may not have flushed")
            hub_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hub_task
            await store.close()
            log.info("stopped")

    async def healthz(_request: Request) -> Response:
        if not hub.running:
            return JSONResponse({"status": "hub stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "uptime_seconds": round(time.time() - started, 1)})

    async def readyz(_request: Request) -> Response:
        checks: dict[str, str] = {}
        ok = True
        try:
            async with asyncio.timeout(2):
                await store.ping()
            checks["storage"] = "ok"
        except Exception:  # noqa: BLE001 - any failure means not ready; the reason is logged, not shown
            log.exception("readiness: storage ping failed")
            checks["storage"] = "unreachable"
            ok = False
        checks["bus"] = "ok" if hub.bus.healthy else "degraded"
        if not hub.accepting:
            checks["server"] = "draining"
            ok = False
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    async def metrics_endpoint(_request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    rooms = WebsocketEndpoint(hub)
    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        *(route for service in services for route in service.routes()),
        WebSocketRoute("/{room:path}", rooms),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.hub = hub
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.store = store
    return RoomsFirst(app, rooms)


class RoomsFirst:
    """Send room websockets straight to their endpoint; everything else to the starlette app.

    A document socket lives for hours; going through starlette's middleware and router would keep
    their suspended frames (~3 KiB) alive per idle connection. Lifespan, HTTP, the services'
    websockets and refusals of reserved paths still go through starlette.
    """

    def __init__(self, app: Starlette, rooms: WebsocketEndpoint) -> None:
        self.app = app
        self.rooms = rooms

    @property
    def state(self):  # noqa: ANN201 - starlette's State
        return self.app.state

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        if scope["type"] == "websocket" and room_name_problem(scope["path"][1:]) is None:
            await self.rooms(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _safe_url(url: str) -> str:
    """A store URL without its password, for logs."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url
