"""Structured logging: JSON in production, readable console in dev, secrets never printed.

uvicorn's own loggers are routed through the same formatter, and a filter strips credentials
(``token=…`` in query strings, ``Bearer …``) from every record, including the websocket
"accepted" lines that would otherwise print the full URL.
"""

from __future__ import annotations

import logging
import re
import sys

import structlog

_SECRET = re.compile(r"((?:token|access_token|auth)=)[^&\s\"']+|(Bearer\s+)[A-Za-z0-9._~+/=-]+|(bearer\.)[A-Za-z0-9._~+/=-]+", re.I)


def redact(text: str) -> str:
    return _SECRET.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + "[redacted]", text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            try:
                record.msg = record.getMessage()
            except Exception:  # noqa: BLE001 - a broken format string must not kill logging
                record.msg = str(record.msg)
            record.args = None
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def _redact_event(_logger: object, _name: str, event_dict: dict) -> dict:
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = redact(value)
    return event_dict


def configure(log_format: str = "auto", level: str = "info") -> None:
    fmt = ("console" if sys.stderr.isatty() else "json") if log_format == "auto" else log_format
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_event,
    ]
    renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if fmt == "console" else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, root.level))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
        lg.filters[:] = [RedactSecrets()]


def get_logger(name: str = "collab") -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
