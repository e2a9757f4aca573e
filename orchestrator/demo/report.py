"""The demo's ending: what each slot did, why jobs failed or were skipped, and the invariants.

Numbers come from our own tables (jobs, the events ledger); the invariants are checked against
what the simulator saw, which is the outside truth: every call, image and deletion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from orchestrator.jobs import LIVE_STATES
from orchestrator.simulator.runner import Simulator

# Dispatcher outcomes that put a job back in the queue for another attempt.
RETRY_OUTCOMES = ("retry", "rotated", "quota_wait", "duplicate_unseen", "created_not_visible")
# Ledger kinds of confirmed deletions, by who deleted: quota rotation, retention, and the
# tracker's clean-up of CREATEFAILED images.
DELETE_KINDS = {
    "rotation.deleted": "deleted: quota rotation",
    "retention.deleted": "deleted: retention",
    "image.deleted": "deleted: CREATEFAILED",
}
WATCHED_ACTIONS = (
    "CreateImage",
    "SyncImages",
    "DeleteImages",
    "DescribeImages",
    "DescribeInstances",
)
# A driven slot: its time and the ledger id range (after, upto] of its drive.
DrivenSlot = tuple[datetime, tuple[int, int]]

_RETRIED = """
SELECT count(DISTINCT e.job_id) AS jobs, count(*) AS retries
FROM events e JOIN jobs j ON j.id = e.job_id
WHERE j.slot = $1 AND e.kind = 'job.attempt' AND e.details->>'outcome' = ANY($2::text[])
"""

_DELETED = """
SELECT kind, count(*) AS n FROM events
WHERE kind = ANY($1::text[]) AND id > $2 AND id <= $3 GROUP BY kind
"""

_CAUSES = """
SELECT coalesce(details->>'code', details->>'outcome') AS code,
       coalesce(details->>'error_class', '-') AS error_class, count(*) AS n
FROM events WHERE kind = 'job.attempt' AND details->>'outcome' = ANY($1::text[])
GROUP BY 1, 2 ORDER BY n DESC, code
"""

_ENDINGS = """
SELECT state, coalesce(reason, '-') AS reason, coalesce(last_error_code, '') AS code,
       coalesce(min(last_error_message), '') AS message, count(*) AS n,
       array_agg(DISTINCT instance_id ORDER BY instance_id) AS instances
FROM jobs WHERE state = ANY($1::text[])
GROUP BY 1, 2, 3 ORDER BY n DESC, reason
"""


async def event_watermark(pool: asyncpg.Pool) -> int:
    """The newest ledger row's id: deletions after it belong to what runs next."""
    return int(await pool.fetchval("SELECT coalesce(max(id), 0) FROM events") or 0)


@dataclass(frozen=True, slots=True)
class SlotTally:
    """What one slot's run did."""

    slot: datetime
    states: dict[str, int]
    retried_jobs: int
    retries: int
    deleted: dict[str, int]  # by ledger kind, during the slot's drive
    copied: int = 0  # copies made in other regions (policies.copies)

    def row(self, label: str) -> int:
        """The value of one summary row."""
        values = {
            "jobs": sum(self.states.values()),
            "backed up": self.states.get("succeeded", 0),
            "copied to another region": self.copied,
            "failed": self.states.get("failed", 0),
            "skipped": self.states.get("skipped", 0),
            "expired": self.states.get("expired", 0),
            "retried (jobs)": self.retried_jobs,
            "retries (attempts)": self.retries,
        }
        values.update({name: self.deleted.get(kind, 0) for kind, name in DELETE_KINDS.items()})
        return values[label]


ROWS = (
    "jobs",
    "backed up",
    "copied to another region",
    "failed",
    "skipped",
    "expired",
    "retried (jobs)",
    "retries (attempts)",
    *DELETE_KINDS.values(),
)


async def tally_slot(pool: asyncpg.Pool, slot: datetime, events: tuple[int, int]) -> SlotTally:
    """The tally of `slot`; `events` is the ledger id range (after, upto] of its drive."""
    # Backups only: their copies (a row of their own) are the same instances again.
    states = await pool.fetch(
        "SELECT state, count(*) AS n FROM jobs WHERE slot = $1 AND kind = 'backup' GROUP BY state",
        slot,
    )
    copied = await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE slot = $1 AND kind = 'copy' AND state = 'succeeded'",
        slot,
    )
    retried = await pool.fetchrow(_RETRIED, slot, list(RETRY_OUTCOMES))
    deleted = await pool.fetch(_DELETED, list(DELETE_KINDS), *events)
    return SlotTally(
        slot=slot,
        states={r["state"]: int(r["n"]) for r in states},
        retried_jobs=int(retried["jobs"]) if retried else 0,
        retries=int(retried["retries"]) if retried else 0,
        deleted={r["kind"]: int(r["n"]) for r in deleted},
        copied=int(copied or 0),
    )


@dataclass(frozen=True, slots=True)
class Ending:
    """Jobs that ended the same way (state, reason, error code)."""

    state: str
    reason: str
    code: str
    message: str
    count: int
    instances: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Check:
    """One invariant: `value` counts violations, so 0 means it holds."""

    name: str
    value: int
    detail: str = ""

    @property
    def ok(self) -> bool:
        """Whether the invariant holds."""
        return self.value == 0


@dataclass(frozen=True, slots=True)
class Report:
    """Everything the summary shows."""

    slots: tuple[SlotTally, ...]
    causes: tuple[tuple[str, str, int], ...]  # (code, error class, retries)
    failed: tuple[Ending, ...]
    skipped: tuple[Ending, ...]
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        """Whether every invariant holds."""
        return all(c.ok for c in self.checks)


async def _endings(pool: asyncpg.Pool, states: Sequence[str]) -> tuple[Ending, ...]:
    rows = await pool.fetch(_ENDINGS, list(states))
    return tuple(
        Ending(r["state"], r["reason"], r["code"], r["message"], int(r["n"]), tuple(r["instances"]))
        for r in rows
    )


async def _causes(pool: asyncpg.Pool) -> tuple[tuple[str, str, int], ...]:
    rows = await pool.fetch(_CAUSES, list(RETRY_OUTCOMES))
    return tuple((r["code"], r["error_class"], int(r["n"])) for r in rows)


# -- invariants, from the simulator's point of view -------------------------------------------


def _rate_check(sim: Simulator) -> Check:
    violations = sum(sim.state.violations.values())
    busiest = ", ".join(
        f"{action} {sim.state.max_window(action)} of {sim.config.limit(action)}"
        for action in WATCHED_ACTIONS
    )
    return Check("rate-limit violations", violations, f"busiest second: {busiest}")


def _foreign_check(sim: Simulator, foreign_ids: Sequence[str]) -> Check:
    images = sim.state.images
    deleted = sum(1 for d in sim.state.deletions if not images[d.image_id].ours)
    intact = sum(1 for i in foreign_ids if images[i].alive)
    return Check(
        "deletions of images not ours", deleted, f"{intact} of {len(foreign_ids)} left intact"
    )


async def _recorded_check(pool: asyncpg.Pool, sim: Simulator) -> Check:
    recorded = {r["image_id"] for r in await pool.fetch("SELECT image_id FROM images")}
    made = [*sim.state.iter_ours(), *sim.state.iter_copies()]
    missing = [i.image_id for i in made if i.image_id not in recorded]
    return Check("images made but not recorded", len(missing), ", ".join(missing[:5]))


async def _terminal_check(pool: asyncpg.Pool) -> Check:
    live = await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE state = ANY($1::text[])", list(LIVE_STATES)
    )
    total = await pool.fetchval("SELECT count(*) FROM jobs")
    return Check("jobs not in a terminal state", int(live or 0), f"of {int(total or 0)} jobs")


async def _copies_check(pool: asyncpg.Pool, sim: Simulator, slot: datetime) -> Check:
    """Each good backup of the slot whose policy copies has exactly one live copy per region."""
    rows = await pool.fetch(
        "SELECT j.image_id, d.region FROM jobs j JOIN policies p ON p.id = j.policy_id,"
        " jsonb_to_recordset(p.copies) AS d(region text)"
        " WHERE j.slot = $1 AND j.kind = 'backup' AND j.state = 'succeeded'",
        slot,
    )
    wrong = 0
    for row in rows:
        live = [c for c in sim.state.iter_copies(row["image_id"]) if c.alive]
        wrong += sum(1 for c in live if c.region == row["region"]) != 1
    return Check("backups not copied once", wrong, f"{len(rows) - wrong} copied once")


async def _newest_check(pool: asyncpg.Pool, sim: Simulator, slot: datetime) -> Check:
    ids = [
        r["image_id"]
        for r in await pool.fetch(
            "SELECT image_id FROM jobs WHERE slot = $1 AND state = 'succeeded'", slot
        )
    ]
    gone = [i for i in ids if i not in sim.state.images or not sim.state.images[i].alive]
    return Check("newest good images deleted", len(gone), f"{len(ids) - len(gone)} in place")


def _scheduled_check(tallies: Sequence[SlotTally], expected: int) -> Check:
    short = sum(max(expected - sum(t.states.values()), 0) for t in tallies)
    return Check("jobs missing from a slot", short, f"{expected} expected per slot")


async def checks(
    pool: asyncpg.Pool, sim: Simulator, foreign_ids: Sequence[str], last_slot: datetime
) -> tuple[Check, ...]:
    """Every invariant the demo promises, as the simulator saw it."""
    return (
        _rate_check(sim),
        Check("duplicate images", len(sim.state.duplicates), "one image per policy/instance/slot"),
        _foreign_check(sim, foreign_ids),
        await _newest_check(pool, sim, last_slot),
        await _copies_check(pool, sim, last_slot),
        await _terminal_check(pool),
        await _recorded_check(pool, sim),
    )


async def build_report(
    pool: asyncpg.Pool,
    sim: Simulator,
    slots: Sequence[DrivenSlot],
    foreign_ids: Sequence[str],
    expected_jobs: int,
) -> Report:
    """Gather the summary of the slots driven so far; `expected_jobs` per slot."""
    tallies = tuple([await tally_slot(pool, slot, events) for slot, events in slots])
    invariants = await checks(pool, sim, foreign_ids, slots[-1][0])
    return Report(
        slots=tallies,
        causes=await _causes(pool),
        failed=await _endings(pool, ("failed", "expired")),
        skipped=await _endings(pool, ("skipped",)),
        checks=(*invariants, _scheduled_check(tallies, expected_jobs)),
    )


# -- rendering ----------------------------------------------------------------------------


def _slot_label(index: int, slot: datetime) -> str:
    return f"slot {index} {slot:%H:%M}Z"


def _table(report: Report) -> list[str]:
    heads = [_slot_label(n, t.slot) for n, t in enumerate(report.slots, start=1)]
    lines = ["  " + " " * 26 + "".join(f"{h:>15}" for h in [*heads, "total"])]
    for label in ROWS:
        values = [t.row(label) for t in report.slots]
        cells = "".join(f"{v:>15}" for v in [*values, sum(values)])
        lines.append(f"  {label:<26}{cells}")
    return lines


def _endings_lines(title: str, endings: Sequence[Ending]) -> list[str]:
    lines = [title]
    for e in endings:
        error = f" {e.code}: {e.message}" if e.code else ""
        shown = ", ".join(e.instances[:6]) + (" ..." if len(e.instances) > 6 else "")
        lines.append(f"  {e.count:>3} {e.state} ({e.reason}){error}")
        lines.append(f"      on {len(e.instances)} instance(s): {shown}")
    if not endings:
        lines.append("  none")
    return lines


def _causes_lines(report: Report) -> list[str]:
    lines = ["Retries by cause (code, error class: attempts)"]
    lines += [f"  {code:<44} {cls:<10} {n:>5}" for code, cls, n in report.causes]
    if not report.causes:
        lines.append("  none")
    return lines


def _checks_lines(report: Report) -> list[str]:
    lines = ["Invariants (checked against what the simulator saw)"]
    for c in report.checks:
        mark = "ok  " if c.ok else "FAIL"
        lines.append(f"  {mark} {c.name:<30} {c.value:>5}   {c.detail}".rstrip())
    return lines


def render(report: Report) -> str:
    """The summary, as printed at the end of the demo."""
    slots = ", ".join(
        f"slot {n} = {t.slot:%Y-%m-%d %H:%M} UTC" for n, t in enumerate(report.slots, start=1)
    )
    parts = [
        [f"Summary ({slots})"],
        _table(report),
        _causes_lines(report),
        _endings_lines("Failed, with reasons", report.failed),
        _endings_lines("Skipped, with reasons", report.skipped),
        _checks_lines(report),
    ]
    return "\n\n".join("\n".join(p) for p in parts)


def as_json(report: Report) -> dict[str, Any]:
    """The report as plain data (for `--json`)."""
    return {
        "slots": [
            {"slot": t.slot.isoformat(), **{label: t.row(label) for label in ROWS}}
            for t in report.slots
        ],
        "retry_causes": [{"code": c, "error_class": k, "attempts": n} for c, k, n in report.causes],
        "failed": [_ending_json(e) for e in report.failed],
        "skipped": [_ending_json(e) for e in report.skipped],
        "checks": [{"name": c.name, "value": c.value, "ok": c.ok} for c in report.checks],
        "ok": report.ok,
    }


def _ending_json(e: Ending) -> dict[str, Any]:
    return {
        "state": e.state,
        "reason": e.reason,
        "code": e.code,
        "message": e.message,
        "count": e.count,
        "instances": list(e.instances),
    }
