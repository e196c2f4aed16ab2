"""``collab serve`` and ``collab token``. Bad settings: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from collections.abc import Sequence

from collab.settings import Settings, SettingsError, add_arguments, load_settings


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_ttl(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (use e.g. 90s, 30m, 1h, 7d)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="collab", description="Realtime collaboration server for Yjs documents.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser("serve", help="run the server")
    add_arguments(serve)
    token = sub.add_parser("token", help="print a signed access token on the last line")
    token.add_argument("--user", required=True, help="user id (the token's subject)")
    token.add_argument("--name", help="display name (default: the user id)")
    token.add_argument("--room", action="append", dest="rooms",
                       help="room name or glob pattern the token allows; repeatable (default '*')")
    token.add_argument("--role", choices=("editor", "viewer"), default="editor")
    token.add_argument("--ttl", type=_parse_ttl, default=_parse_ttl("1h"), help="lifetime, e.g. 90s, 30m, 1h, 7d")
    token.add_argument("--secret", help="signing secret (default: $COLLAB_SECRET)")
    try:
        from benchmarks.cli import add_bench_parser
    except ImportError:
        pass
    else:
        add_bench_parser(sub)
    try:
        from clients.bridge import add_edit_parser
    except ImportError:
        pass
    else:
        add_edit_parser(sub)
    return parser


def serve(settings: Settings) -> int:
    import uvicorn

    from collab.app import create_app
    from collab.logs import configure
    from collab.wsfast import uvicorn_ws

    configure(settings.log_format, settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, ws=uvicorn_ws(settings.ws_impl), lifespan="on",
        ws_max_size=settings.max_frame_bytes + 64 * 1024, ws_per_message_deflate=False,
        access_log=False, log_config=None, proxy_headers=False, server_header=False,
        timeout_graceful_shutdown=settings.drain_seconds, loop="auto", http="auto",
        ws_ping_interval=20.0, ws_ping_timeout=20.0,
    )
    server = uvicorn.Server(config)
    # The garbage collector's young-generation passes are a few percent of a busy server's CPU,
    # and everything allocated so far (modules, settings, app) lives as long as the process:
    # collect less often, and never walk the startup heap again.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    # uvicorn drains on SIGTERM, then restores the previous handler and re-raises the signal;
    # a completed drain is a clean exit, so that handler exits 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()
    return 0 if server.started else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            settings = load_settings(vars(args))
        except SettingsError as exc:
            print(f"collab: error: {exc}", file=sys.stderr)
            return 2
        return serve(settings)
    if args.command == "token":
        from collab.auth import issue_token

        secret = args.secret or os.environ.get("COLLAB_SECRET")
        if not secret:
            print("collab: error: --secret or COLLAB_SECRET is required", file=sys.stderr)
            return 2
        print(issue_token(secret, user=args.user, name=args.name, rooms=args.rooms or ["*"],
                          role=args.role, ttl_seconds=args.ttl))
        return 0
    if args.command in ("bench", "edit"):
        return int(args.func(args) or 0)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
