"""The browser app and the small HTTP API behind its session panel and invites.

Routes
------
``GET /`` and ``GET /r/<room>``
    The app's ``index.html`` (built from ``clients/web`` into ``clients/web/dist`` by ``make web``).
    ``/r/<room>`` is every room's shareable link; ``?name=Ann`` logs in as "Ann" in open dev mode,
    ``?token=…`` carries a token from the host application when the server has ``--secret``.
``GET /static/…``
    The app's assets. Their names carry a content hash, so they are cached for a year (immutable);
    ``index.html`` is ``no-cache`` so a rebuilt app is picked up at once.
``GET /api/me``
    Who the request is (``mode`` = ``dev`` or ``token``, ``user`` = id, name, role); 401 without a
    valid token when the server has a secret.
``GET /api/dev/login?name=Ann``
    Open dev mode only (404 otherwise): the identity ``?name=Ann`` gives, for the login form.
``GET /api/rooms?prefix=``
    The rooms the caller may open: rooms with stored updates and rooms created here (they have no
    updates yet), filtered by the token's room patterns, each with its owner and the caller's role.
``POST /api/rooms`` ``{"name": "team/notes"}``
    Create a room and record the caller as its owner (``owner`` metadata). 409 if it exists.
``POST /api/rooms/<room>/invites`` ``{"role": "editor"|"viewer", "expires_in": seconds}``
    An invite link for the room. The room's owner and its editors may invite; viewers may not.
``GET /api/invites/<code>``
    What an invite is for (room, role, expiry), for the app's "you are invited" page.
``GET /invite/<code>[?name=Bob]``
    Redeem an invite: 303 to ``/r/<room>?token=<token for that room and role>``. Without ``name``
    the app asks for one first. In open dev mode there are no tokens: the redirect carries
    ``?role=viewer`` and the app shows the room read-only, but nothing stops a dev-mode client from
    editing (dev mode gives everyone edit rights on every room, by design).

Storage: owner and invites are room metadata (``owner``, ``invite:<code>`` = JSON). Two index
"rooms" that no client can open (names starting with ``_``) map invite codes to rooms
(``_invites``) and record created rooms (``_webapp``), so an empty new room is listed at once.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from collab.auth import AccessDenied, Identity, dev_identity, issue_token, token_from, verify_token
from collab.closecodes import UNAUTHORIZED
from collab.logs import get_logger
from collab.services import Service
from collab.settings import Settings
from collab.transport import room_name_problem
from storage import Store

log = get_logger("collab.webapp")

DIST = Path(__file__).resolve().parents[1] / "clients" / "web" / "dist"
INDEX_ROOM = "_webapp"  # metadata "room/<digest>" = name of a room created through the API
INVITES_ROOM = "_invites"  # metadata "<code>" = name of the invite's room
MAX_LISTED_ROOMS = 500  # rooms one GET /api/rooms answers with (each costs an owner lookup)
MAX_INVITE_SECONDS = 30 * 86400
DEFAULT_INVITE_SECONDS = 7 * 86400
INVITE_TOKEN_SECONDS = 12 * 3600  # lifetime of the token an invite hands out
MAX_BODY_BYTES = 16 * 1024
MAX_NAME_CHARS = 200
_CODE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"Cache-Control": "no-store"})


def _ok(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


def _user(identity: Identity) -> dict[str, Any]:
    return {"id": identity.user_id, "name": identity.name, "role": identity.role}


class WebAppService(Service):
    name: ClassVar[str] = "webapp"

    def __init__(self, settings: Settings, store: Store, dist: Path = DIST) -> None:
        self.settings = settings
        self.store = store
        self.dist = dist

    # -- identity ------------------------------------------------------------------------------

    def _identify(self, request: Request) -> Identity:
        if self.settings.secret is None:
            return dev_identity(request.query_params.get("name"))
        token, _ = token_from(request)
        if not token:
            raise AccessDenied("token required", UNAUTHORIZED)
        return verify_token(self.settings.secret, token)

    def _who(self, request: Request) -> Identity | Response:
        try:
            return self._identify(request)
        except AccessDenied as denied:
            return _error(denied.reason, 401)

    async def _role_in(self, identity: Identity, room: str) -> str:
        owner = await self.store.get_meta(room, "owner")
        if owner is not None and owner.decode("utf-8", "replace") == identity.user_id:
            return "owner"
        return identity.role

    # -- pages ---------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.index, methods=["GET", "HEAD"]),
            Route("/r/{room:path}", self.index, methods=["GET", "HEAD"]),
            Route("/invite/{code}", self.redeem, methods=["GET", "HEAD"]),
            Route("/static/{path:path}", self.static, methods=["GET", "HEAD"]),
            Route("/api/me", self.me, methods=["GET"]),
            Route("/api/dev/login", self.dev_login, methods=["GET"]),
            Route("/api/rooms", self.list_rooms, methods=["GET"]),
            Route("/api/rooms", self.create_room, methods=["POST"]),
            Route("/api/rooms/{room:path}/invites", self.create_invite, methods=["POST"]),
            Route("/api/invites/{code}", self.invite_info, methods=["GET"]),
        ]

    async def index(self, _request: Request) -> Response:
        index = self.dist / "index.html"
        if not index.is_file():
            return PlainTextResponse("The web app is not built: run `make web` (or `make serve`).", status_code=503)
        return FileResponse(index, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    async def static(self, request: Request) -> Response:
        """Assets: their names carry a content hash, so they are cacheable for a year."""
        root = (self.dist / "static").resolve()
        path = (root / request.path_params["path"]).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(path, headers={"Cache-Control": "public, max-age=31536000, immutable"})

    # -- identity endpoints --------------------------------------------------------------------

    async def me(self, request: Request) -> Response:
        mode = "dev" if self.settings.dev_mode else "token"
        try:
            identity = self._identify(request)
        except AccessDenied as denied:
            return JSONResponse({"mode": mode, "error": denied.reason}, status_code=401,
                                headers={"Cache-Control": "no-store"})
        return _ok({"mode": mode, "user": _user(identity)})

    async def dev_login(self, request: Request) -> Response:
        if not self.settings.dev_mode:
            return _error("dev login is off: this server has a secret; tokens come from the host app", 404)
        name = (request.query_params.get("name") or "").strip()
        if not name:
            return _error("name required", 400)
        if len(name) > MAX_NAME_CHARS or any(ord(ch) < 0x20 for ch in name):
            return _error("bad name", 400)
        return _ok({"mode": "dev", "user": _user(dev_identity(name))})

    # -- rooms ---------------------------------------------------------------------------------

    async def list_rooms(self, request: Request) -> Response:
        identity = self._who(request)
        if isinstance(identity, Response):
            return identity
        prefix = request.query_params.get("prefix", "")
        if len(prefix.encode("utf-8")) > 512:
            return _error("prefix too long", 400)
        names = set(await self.store.rooms(prefix))
        created = await self.store.list_meta(INDEX_ROOM, "room/")
        names.update(v.decode("utf-8", "replace") for v in created.values())
        visible = sorted(n for n in names if n.startswith(prefix) and not n.startswith("_") and identity.allows(n))
        rooms = []
        for name in visible[:MAX_LISTED_ROOMS]:
            owner = await self.store.get_meta(name, "owner")
            owner_id = owner.decode("utf-8", "replace") if owner is not None else None
            rooms.append({"name": name, "owner": owner_id,
                          "role": "owner" if owner_id == identity.user_id else identity.role})
        return _ok({"rooms": rooms, "truncated": len(visible) > MAX_LISTED_ROOMS})

    async def create_room(self, request: Request) -> Response:
        identity = self._who(request)
        if isinstance(identity, Response):
            return identity
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        name = body.get("name")
        if not isinstance(name, str):
            return _error("'name' must be a string", 400)
        name = name.strip()
        if problem := room_name_problem(name):
            return _error(problem, 400)
        if not identity.allows(name):
            return _error("room not allowed", 403)
        if not identity.can_edit:
            return _error("viewers cannot create rooms", 403)
        if await self.store.get_meta(name, "owner") is not None or name in await self.store.rooms(name):
            return _error("room exists", 409)
        await self.store.put_meta(name, "owner", identity.user_id.encode("utf-8"))
        await self.store.put_meta(INDEX_ROOM, "room/" + hashlib.blake2b(name.encode(), digest_size=16).hexdigest(),
                                  name.encode("utf-8"))
        log.info("room created", room=name, owner=identity.user_id)
        return _ok({"name": name, "owner": identity.user_id, "role": "owner", "url": _room_path(name)}, 201)

    # -- invites -------------------------------------------------------------------------------

    async def create_invite(self, request: Request) -> Response:
        identity = self._who(request)
        if isinstance(identity, Response):
            return identity
        room = request.path_params["room"]
        if room_name_problem(room):
            return _error("bad room name", 400)
        if not identity.allows(room):
            return _error("room not allowed", 403)
        if await self._role_in(identity, room) not in ("owner", "editor"):
            return _error("only the room's owner and editors may invite", 403)
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        role = body.get("role", "editor")
        if role not in ("editor", "viewer"):
            return _error("'role' must be editor or viewer", 400)
        expires_in = body.get("expires_in", DEFAULT_INVITE_SECONDS)
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) or \
                not 60 <= expires_in <= MAX_INVITE_SECONDS:
            return _error(f"'expires_in' must be 60..{MAX_INVITE_SECONDS} seconds", 400)
        code = secrets.token_urlsafe(16)
        now = time.time()
        invite = {"room": room, "role": role, "created_by": identity.user_id, "created_at": round(now, 3),
                  "expires_at": round(now + expires_in, 3)}
        await self.store.put_meta(room, "invite:" + code, json.dumps(invite).encode())
        await self.store.put_meta(INVITES_ROOM, code, room.encode("utf-8"))
        log.info("invite created", room=room, role=role, by=identity.user_id)
        path = f"/invite/{code}"
        return _ok({"code": code, "path": path, "url": str(request.base_url).rstrip("/") + path, **invite}, 201)

    async def _invite(self, code: str) -> dict[str, Any] | None:
        if not _CODE.fullmatch(code):
            return None
        room = await self.store.get_meta(INVITES_ROOM, code)
        if room is None:
            return None
        raw = await self.store.get_meta(room.decode("utf-8", "replace"), "invite:" + code)
        return json.loads(raw) if raw is not None else None

    async def invite_info(self, request: Request) -> Response:
        invite = await self._invite(request.path_params["code"])
        if invite is None:
            return _error("no such invite", 404)
        expired = invite["expires_at"] < time.time()
        return _ok({"room": invite["room"], "role": invite["role"], "expires_at": invite["expires_at"],
                    "expired": expired, "mode": "dev" if self.settings.dev_mode else "token"})

    async def redeem(self, request: Request) -> Response:
        code = request.path_params["code"]
        invite = await self._invite(code)
        if invite is None:
            return PlainTextResponse("This invite link is not valid.", status_code=404)
        if invite["expires_at"] < time.time():
            return PlainTextResponse("This invite link has expired.", status_code=410)
        name = (request.query_params.get("name") or "").strip()[:MAX_NAME_CHARS]
        if not name or any(ord(ch) < 0x20 for ch in name):
            return await self.index(request)  # the app asks for a name, then comes back here
        room, role = invite["room"], invite["role"]
        params: dict[str, str] = {}
        if self.settings.secret is None:
            params = {"name": name, "role": role}
        else:
            user = f"invite:{code[:8]}:{secrets.token_hex(4)}"
            params = {"token": issue_token(self.settings.secret, user=user, name=name, rooms=[room], role=role,
                                           ttl_seconds=INVITE_TOKEN_SECONDS)}
        log.info("invite redeemed", room=room, role=role)
        return RedirectResponse(_room_path(room) + "?" + urlencode(params), status_code=303,
                                headers={"Cache-Control": "no-store"})


def _room_path(room: str) -> str:
    return "/r/" + quote(room, safe="/")


async def _json_body(request: Request) -> dict[str, Any] | Response:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        return _error("body too large", 413)
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        return _error("body is not JSON", 400)
    if not isinstance(body, dict):
        return _error("body must be a JSON object", 400)
    return body
