"""How old a policy's newest good backup may be right now: the RPO the metrics report.

A job for slot S may take until S + completion_window. So at `now` every target instance should
have a good image taken at or after S_k, the newest slot whose window has closed, and that image
may grow as old as (S_k+1 - S_k) + completion_window before the next slot's window closes. That
sum is the policy's expected interval, `cvm_backup_policy_rpo_seconds`; an instance whose newest
good image is older than it is overdue.

Measured from the gap *after* the newest closed slot, not the one before it: with a weekday
schedule ("0 3 * * 1-5") Friday's image must last until Monday's window closes, and a gap taken
from Thursday to Friday would call it overdue all weekend. The price is that a failure just
before a long gap is noticed only when that gap has passed, never earlier than it is real.
"""

from __future__ import annotations

from datetime import datetime

from orchestrator.policies import Policy, latest_slot_at_or_before, next_slot_after

# What croniter and zoneinfo raise on a schedule they cannot walk (as the scheduler catches).
_SCHEDULE_ERRORS = (ValueError, KeyError, ArithmeticError)


def expected_interval(policy: Policy, now: datetime) -> float | None:
    """Seconds the newest good backup may be old at `now`; None when the schedule cannot say."""
    window = policy.completion_window
    try:
        closed = latest_slot_at_or_before(policy, now - window)
        following = next_slot_after(policy, closed)
    except _SCHEDULE_ERRORS:
        return None
    return (following - closed + window).total_seconds()


def is_overdue(last_good: float, now: float, interval: float) -> bool:
    """Whether a newest good backup taken at `last_good` (Unix time; 0: none) is too old."""
    return now - last_good > interval
