"""Durable retry delays: exponential backoff with full jitter, capped.

The delay is written to `jobs.next_attempt_at`, so a retry survives a restart (invariant 5 of
docs/design.md#invariants); in-memory retry lives only in the client's short in-call layer.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from orchestrator.config import RetrySettings
from orchestrator.tencent.errors import ErrorClass


def base_for(error_class: ErrorClass, retry: RetrySettings) -> float:
    """The first backoff step of one error class: busy instances wait longer than transients."""
    if error_class is ErrorClass.BUSY:
        return retry.busy_base
    if error_class is ErrorClass.THROTTLED:
        return retry.throttle_delay
    return retry.transient_base


def delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))] (AWS architecture blog)."""
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    return (rng or random).uniform(0.0, ceiling)


def next_attempt(
    now: datetime, attempt: int, base: float, cap: float, deadline: datetime | None
) -> datetime:
    """When to try again; never later than the completion window's end."""
    when = now + timedelta(seconds=delay(attempt, base, cap))
    return min(when, deadline) if deadline is not None else when
