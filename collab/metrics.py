"""Prometheus metrics. One registry per app instance, so several servers can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections = Gauge("collab_connections", "Open websocket connections", registry=r)
        self.rooms_loaded = Gauge("collab_rooms_loaded", "Rooms loaded in memory", registry=r)
        self.updates_in = Counter("collab_updates_received", "Document updates received from clients", registry=r)
        self.updates_relayed = Counter("collab_updates_relayed", "Update frames queued to clients", registry=r)
        self.updates_rejected = Counter("collab_updates_rejected", "Updates dropped (viewer edits)", registry=r)
        self.bytes_in = Counter("collab_bytes_in", "Websocket payload bytes received", registry=r)
        self.bytes_out = Counter("collab_bytes_out", "Websocket payload bytes sent", registry=r)
        self.awareness_rejected = Counter(
            "collab_awareness_rejected", "Awareness entries dropped (clientID owned by another connection)", registry=r
        )
        self.commit_seconds = Histogram(
            "collab_storage_commit_seconds", "Time for a batch of updates to become durable", buckets=LATENCY_BUCKETS, registry=r
        )
        self.relay_seconds = Histogram(
            "collab_relay_seconds", "Time from receiving an update to queueing it to every other member",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.room_load_seconds = Histogram("collab_room_load_seconds", "Time to load a room", buckets=LATENCY_BUCKETS, registry=r)
        self.closes = Counter("collab_closes", "Connections closed by the server, by close code", ["code"], registry=r)
        self.compactions = Counter("collab_compactions", "Room log compactions", registry=r)
        self.storage_errors = Counter("collab_storage_errors", "Failed storage operations", registry=r)

        self.bus_healthy = Gauge("collab_bus_healthy", "1 while the bus (Redis) is connected", registry=r)
        self.bus_healthy.set(1)
        self.bus_published = Counter("collab_bus_published", "Messages published to the bus", registry=r)
        self.bus_received = Counter("collab_bus_received", "Messages received from peer nodes", registry=r)
        self.bus_dropped = Counter("collab_bus_dropped", "Messages not published (bus down or queue full)", registry=r)
        self.bus_gaps = Counter("collab_bus_gaps", "Sequence gaps detected (messages lost by the bus)", registry=r)
        self.bus_reconnects = Counter("collab_bus_reconnects", "Bus (re)connections", registry=r)
        self.bus_malformed = Counter("collab_bus_malformed", "Undecodable bus messages", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
