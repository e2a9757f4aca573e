"""Which images a policy keeps: keep_last, calendar buckets (GFS) and max age. Pure, no I/O.

The bucket rules follow restic's `forget`: `keep_daily N` keeps the newest image of each of the N
most recent calendar days (in the policy's timezone) that have images; weekly buckets are ISO
weeks; monthly and yearly likewise. Rules are ORed. Two deliberate differences from restic:

- restic >= 0.16 also keeps the oldest snapshot when a bucket rule is not yet full; we do not,
  so a rule keeps exactly the newest image of each of its buckets and nothing else.
- When no keep rule is set, everything is kept (restic refuses an empty policy): a policy that
  forgot its retention section must never wipe its history. `max_age_days` still applies.

Safety rules, stronger than any keep rule:

- Only NORMAL images fill keep slots. Any other state (CREATING, SYNCING, unknown) is never
  deleted here. CREATEFAILED images are not retention's business either: the tracker deletes
  them when it sees the failure, and quota rotation evicts any that remain. Keeping them out of
  retention means a failed image can never push a good one out of a slot.
- The newest NORMAL image is never deleted, even when older than `max_age_days`.
- Images not recorded as ours are never candidates: they are always kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

NORMAL = "NORMAL"
CREATEFAILED = "CREATEFAILED"


@dataclass(frozen=True, slots=True)
class Rules:
    """A policy's retention rules; 0 disables a count rule, None disables max age."""

    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    max_age_days: int | None = None

    def has_keep_rule(self) -> bool:
        """Whether any count rule is set."""
        counts = (self.keep_last, self.keep_daily, self.keep_weekly)
        return any(n > 0 for n in (*counts, self.keep_monthly, self.keep_yearly))


@dataclass(frozen=True, slots=True)
class Candidate:
    """One image of a (policy, instance) as recorded by us; `created` is timezone-aware."""

    image_id: str
    created: datetime
    state: str
    ours: bool = True
    # Why it must stay whatever the rules say (a copy of it is still being made), or None.
    pinned: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """Keep or delete one image, and why."""

    image_id: str
    keep: bool
    reasons: tuple[str, ...]

    @property
    def action(self) -> str:
        """ "keep" or "delete"."""
        return "keep" if self.keep else "delete"


# A bucket rule: its name and how a local time maps to its bucket label.
Bucketer = Callable[[datetime], str]


def _iso_week(t: datetime) -> str:
    year, week, _ = t.isocalendar()
    return f"{year}-W{week:02d}"


BUCKETS: tuple[tuple[str, str, Bucketer], ...] = (
    ("daily", "keep_daily", lambda t: t.date().isoformat()),
    ("weekly", "keep_weekly", _iso_week),
    ("monthly", "keep_monthly", lambda t: f"{t.year}-{t.month:02d}"),
    ("yearly", "keep_yearly", lambda t: str(t.year)),
)


def decide(
    rules: Rules, timezone: str, now: datetime, images: Iterable[Candidate]
) -> list[Decision]:
    """A decision for every image, newest first (ties broken by image id)."""
    items = sorted(images, key=lambda c: (_aware(c.created), c.image_id), reverse=True)
    normal = [c for c in items if c.ours and c.state == NORMAL]
    reasons = _keep_reasons(rules, ZoneInfo(timezone), normal)
    expired = _expired(rules, now, normal)
    if normal:
        reasons.setdefault(normal[0].image_id, []).insert(0, "newest NORMAL")
        expired.discard(normal[0].image_id)
    return [_decision(c, reasons.get(c.image_id, []), expired, rules) for c in items]


def deletions(decisions: Iterable[Decision]) -> list[Decision]:
    """The delete decisions only."""
    return [d for d in decisions if not d.keep]


def _aware(t: datetime) -> datetime:
    # A naive time would be read as the host's local time and land in the wrong bucket.
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"image time {t!r} has no timezone")
    return t


def _keep_reasons(rules: Rules, tz: ZoneInfo, normal: Sequence[Candidate]) -> dict[str, list[str]]:
    reasons: dict[str, list[str]] = {}
    if not rules.has_keep_rule():
        for c in normal:
            reasons[c.image_id] = ["no keep rules set"]
        return reasons
    for i, c in enumerate(normal[: rules.keep_last]):
        reasons.setdefault(c.image_id, []).append(f"keep_last {i + 1}/{rules.keep_last}")
    for name, field, bucket in BUCKETS:
        for image_id, label in _newest_per_bucket(normal, tz, bucket, getattr(rules, field)):
            reasons.setdefault(image_id, []).append(f"{name} {label}")
    return reasons


def _newest_per_bucket(
    normal: Sequence[Candidate], tz: ZoneInfo, bucket: Bucketer, count: int
) -> list[tuple[str, str]]:
    """(image id, bucket label) of the newest image of each of the `count` newest buckets."""
    chosen: list[tuple[str, str]] = []
    seen: set[str] = set()
    for c in normal:  # newest first, so the first image met in a bucket is its newest
        if len(chosen) >= count:
            break
        label = bucket(c.created.astimezone(tz))
        if label not in seen:
            seen.add(label)
            chosen.append((c.image_id, label))
    return chosen


def _expired(rules: Rules, now: datetime, normal: Sequence[Candidate]) -> set[str]:
    if rules.max_age_days is None:
        return set()
    try:
        cutoff = _aware(now) - timedelta(days=rules.max_age_days)
    except OverflowError:
        # Older than the calendar itself: a row that predates migration 0006's bound expires
        # nothing, which is exactly what such an age means.
        return set()
    return {c.image_id for c in normal if c.created < cutoff}


def _held(c: Candidate) -> str | None:
    """Why `c` is kept before any rule is asked, or None when the rules decide."""
    if not c.ours:
        return "not ours: never a candidate"
    if c.pinned is not None:
        return c.pinned
    if c.state == CREATEFAILED:
        return "CREATEFAILED: left to the tracker and rotation"
    if c.state != NORMAL:
        return f"state {c.state}: not deletable"
    return None


def _decision(c: Candidate, kept_for: list[str], expired: set[str], rules: Rules) -> Decision:
    if (held := _held(c)) is not None:
        return Decision(c.image_id, True, (held,))
    if c.image_id in expired:
        return Decision(
            c.image_id, False, (f"expired: older than max_age_days {rules.max_age_days}",)
        )
    if kept_for:
        return Decision(c.image_id, True, tuple(kept_for))
    return Decision(c.image_id, False, ("not selected by any rule",))
