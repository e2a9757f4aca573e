"""Pure arithmetic on what was observed: rates, utilization, ratios."""

from __future__ import annotations

import itertools
from collections.abc import Sequence


def span_rate(times: Sequence[float]) -> float | None:
    """Calls per second between the first and the last call; None for fewer than two."""
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def ratio(value: float | None, base: float | None, digits: int = 3) -> float | None:
    """value / base, rounded; None when either is missing or base is zero."""
    if value is None or not base:
        return None
    return round(value / base, digits)


def seconds(value: float | None, digits: int = 2) -> float | None:
    """A duration rounded for the report."""
    return None if value is None else round(value, digits)


def max_gap(times: Sequence[float]) -> float | None:
    """The longest pause between consecutive calls (e.g. between two tracker polls)."""
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return round(max(gaps), 2) if gaps else None
