"""Small statistics helpers shared by the benchmarks (percentiles over latency samples)."""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence

import numpy as np


def percentiles(samples: Sequence[float] | np.ndarray, missing: int = 0,
                qs: Iterable[float] = (50, 95, 99)) -> dict[str, float | None]:
    """Percentiles in milliseconds of ``samples`` (seconds). ``missing`` counts deliveries that never
    happened: they are ranked as infinitely late, so losing more than 1% makes p99 infinite."""
    arr = np.asarray(samples, dtype=np.float64)
    total = arr.size + missing
    out: dict[str, float | None] = {}
    if total == 0:
        for q in qs:
            out[f"p{q:g}"] = None
        out["max"] = None
        out["mean"] = None
        return out
    arr = np.sort(arr)
    for q in qs:
        rank = math.ceil(q / 100 * total) - 1  # nearest-rank
        rank = max(rank, 0)
        out[f"p{q:g}"] = round(float(arr[rank]) * 1000, 3) if rank < arr.size else math.inf
    out["max"] = math.inf if missing else (round(float(arr[-1]) * 1000, 3) if arr.size else None)
    out["mean"] = round(float(arr.mean()) * 1000, 3) if arr.size else None
    return out


def from_bytes(blobs: Iterable[bytes]) -> np.ndarray:
    parts = [np.frombuffer(b, dtype=np.float64) for b in blobs if b]
    return np.concatenate(parts) if parts else np.zeros(0)


def to_bytes(values: array) -> bytes:
    return values.tobytes()


def finite(value: float | None) -> float | None:
    """JSON has no infinity: report it as None (callers say 'lost' alongside)."""
    if value is None or (isinstance(value, float) and math.isinf(value)):
        return None
    return value


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 10:
        return f"{value:.1f} ms"
    return f"{value:.2f} ms"
