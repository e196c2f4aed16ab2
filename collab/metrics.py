"""Prometheus metrics. One registry per app instance, so several servers can live in one process.

The per-message metrics (bytes in/out, updates in/relayed, relay and commit latency) are touched
several times per update on the event loop. prometheus_client's Counter and Histogram take a
lock on every ``inc``/``observe`` — a measurable share of the hot path — so those few are
``LoopCounter`` / ``LoopHistogram``: plain attributes, only ever updated from the event loop's
thread, turned into metric families when /metrics is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LoopCounter:
    """A counter updated only from the event loop's thread: no lock."""

    __slots__ = ("name", "documentation", "value")

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount

    def family(self) -> Metric:
        return CounterMetricFamily(self.name, self.documentation, value=self.value)


class LoopHistogram:
    """A histogram updated only from the event loop's thread: no lock."""

    __slots__ = ("name", "documentation", "bounds", "counts", "sum")

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self) -> Metric:
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        return HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)


class _LoopCollector:
    def __init__(self, metrics: list[LoopCounter | LoopHistogram]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            yield metric.family()


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections = Gauge("collab_connections", "Open websocket connections", registry=r)
        self.rooms_loaded = Gauge("collab_rooms_loaded", "Rooms loaded in memory", registry=r)
        self.updates_in = LoopCounter("collab_updates_received", "Document updates received from clients")
        self.updates_relayed = LoopCounter("collab_updates_relayed", "Update frames queued to clients")
        self.updates_rejected = Counter("collab_updates_rejected", "Updates dropped (viewer edits)", registry=r)
        self.bytes_in = LoopCounter("collab_bytes_in", "Websocket payload bytes received")
        self.bytes_out = LoopCounter("collab_bytes_out", "Websocket payload bytes sent")
        self.awareness_rejected = Counter(
            "collab_awareness_rejected", "Awareness entries dropped (clientID owned by another connection)", registry=r
        )
        self.commit_seconds = LoopHistogram(
            "collab_storage_commit_seconds", "Time for a batch of updates to become durable", LATENCY_BUCKETS)
        self.relay_seconds = LoopHistogram(
            "collab_relay_seconds", "Time from receiving an update to queueing it to every other member",
            LATENCY_BUCKETS)
        r.register(_LoopCollector([self.updates_in, self.updates_relayed, self.bytes_in, self.bytes_out,
                                   self.commit_seconds, self.relay_seconds]))
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
