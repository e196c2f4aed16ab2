"""First-party clients: the Python client (tests, benchmarks, editor plugins) and the browser app."""

from clients.yclient import ClosedError, YClient, room_url

__all__ = ["ClosedError", "YClient", "room_url"]
