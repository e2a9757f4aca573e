"""The history benchmark's rows: a fleet backed up daily for a year, written with generate_series.

Every instance is backed up at 00:00 UTC each day and every backup succeeded. Each day leaves
what the daemon writes for it: a run, a job per instance, an image, the job's `job.attempt` and
`job.succeeded` ledger rows, and the `retention.kept` row per live image that retention after
the backup records; the image an older day's backup let go has its three deletion rows, and its
images row is marked deleted. Which images are still alive is what `retention.decide` keeps
today, so a retention sweep over the result has nothing to delete, exactly as on a real
deployment between two backups.

"Empty history" is the same fleet with only the rows the live state needs: the live images,
their jobs, runs and job rows, what pruning everything prunable would leave. Both have today's
run with every job pending (what claims are timed on).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from orchestrator import retention

REGION = "ap-guangzhou"
ACCOUNT = "default"
INSTANCES_PER_POLICY = 300
RULES = retention.Rules(keep_daily=7, keep_weekly=4, keep_monthly=12, max_age_days=400)
# When, after its slot, each of a backup's rows was written.
IMAGE_AFTER = timedelta(minutes=5)
# A backup that no rule keeps goes when the eighth newer daily one arrives (keep_daily = 7).
DELETED_AFTER = timedelta(days=8)


@dataclass(frozen=True, slots=True)
class Shape:
    """How much: instances, days of history, and which of those days' images are alive."""

    instances: int
    days: int
    today: datetime  # 00:00 UTC: today's slot, whose jobs are pending
    kept: tuple[int, ...]  # ages in days of the slots whose images retention keeps

    @property
    def policies(self) -> int:
        """One policy per INSTANCES_PER_POLICY instances."""
        return max(1, -(-self.instances // INSTANCES_PER_POLICY))


def shape(instances: int, days: int, now: datetime | None = None) -> Shape:
    """The fleet's shape today, with the days retention keeps (the same for every instance)."""
    now = now or datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    images = [
        retention.Candidate(f"d{age}", today - timedelta(days=age) + IMAGE_AFTER, retention.NORMAL)
        for age in range(1, days + 1)
    ]
    decisions = retention.decide(RULES, "UTC", now, images)
    kept = sorted(int(d.image_id[1:]) for d in decisions if d.keep)
    return Shape(instances, days, today, tuple(kept))


_POLICIES = """
INSERT INTO policies (name, region, schedule, timezone, instance_ids, keep_daily, keep_weekly,
                      keep_monthly, max_age_days)
SELECT format('hist-%s', lpad(p::text, 3, '0')), $1, '0 0 * * *', 'UTC',
       (SELECT array_agg(format('ins-h%s', lpad(n::text, 7, '0')) ORDER BY n)
        FROM generate_series(p * $3, least($2, (p + 1) * $3) - 1) AS n),
       $4, $5, $6, $7
FROM generate_series(0, ($2 - 1) / $3) AS p
"""

_INSTANCES = """
CREATE TEMP TABLE bench_instances AS
SELECT p.id AS policy_id, p.name AS policy, i.instance_id, i.n
FROM policies p, unnest(p.instance_ids) WITH ORDINALITY AS i(instance_id, n)
"""

# Past days' runs (completed a quarter of an hour after their slot) and today's (running).
_RUNS = """
INSERT INTO runs (policy_id, slot, state, created_at, completed_at)
SELECT p.id, $1::timestamptz - make_interval(days => d),
       CASE WHEN d = 0 THEN 'running' ELSE 'completed' END,
       $1::timestamptz - make_interval(days => d),
       CASE WHEN d = 0 THEN NULL
            ELSE $1::timestamptz - make_interval(days => d) + interval '15 minutes' END
FROM unnest($2::int[]) AS d, policies p
ORDER BY d DESC, p.id
"""

_RUN_EVENTS = """
INSERT INTO events (at, kind, policy_id, run_id, reason, details)
SELECT created_at, 'run.created', policy_id, id, 'schedule', '{}' FROM runs WHERE slot = $1
"""

# Ordered by slot so that ids grow with time, as they do when the daemon writes them.
_JOBS = """
INSERT INTO jobs (run_id, policy_id, account, region, instance_id, slot, image_name, state,
                  next_attempt_at, deadline, image_id, reason, last_request_id, created_at,
                  updated_at, finished_at)
SELECT r.id, r.policy_id, $1::text, $2::text, i.instance_id, r.slot,
       format('cvmbk-%s-%s-%s', i.policy, i.instance_id,
              to_char(r.slot AT TIME ZONE 'UTC', 'YYYYMMDD"T"HH24MI"Z"')),
       CASE WHEN r.state = 'running' THEN 'pending' ELSE 'succeeded' END,
       CASE WHEN r.state = 'running' THEN now() - interval '1 minute' ELSE r.slot END,
       r.slot + CASE WHEN r.state = 'running' THEN interval '2 days' ELSE interval '6 hours' END,
       CASE WHEN r.state = 'running' THEN NULL
            ELSE format('img-%s', to_hex(r.id * 100000 + i.n)) END,
       CASE WHEN r.state = 'running' THEN NULL ELSE 'image_ready' END,
       CASE WHEN r.state = 'running' THEN NULL ELSE format('req-%s-%s', r.id, i.n) END,
       r.slot, r.slot + interval '10 minutes',
       CASE WHEN r.state = 'running' THEN NULL ELSE r.slot + interval '10 minutes' END
FROM runs r JOIN bench_instances i ON i.policy_id = r.policy_id
ORDER BY r.slot, r.id, i.n
"""

_IMAGES = """
INSERT INTO images (image_id, name, account, region, instance_id, policy_id, slot, job_id, state,
                    size_gb, created_at, ready_at, delete_requested_at, delete_reason,
                    delete_sent_at, delete_kind, deleted_at)
SELECT j.image_id, j.image_name, j.account, j.region, j.instance_id, j.policy_id, j.slot, j.id,
       'NORMAL', 50, j.slot + $2::interval, j.slot + interval '10 minutes',
       gone, CASE WHEN gone IS NULL THEN NULL ELSE 'not selected by any rule' END,
       gone + interval '1 second', CASE WHEN gone IS NULL THEN NULL ELSE 'retention' END,
       gone + interval '1 minute'
FROM jobs j,
     LATERAL (SELECT CASE WHEN extract(day FROM $1::timestamptz - j.slot)::int = ANY($4::int[])
                          THEN NULL
                          ELSE least(j.slot + $3::interval, now() - interval '2 minutes')
                     END AS gone) AS g
WHERE j.state = 'succeeded'
ORDER BY j.id
"""

# One day's ledger: its backups' rows, and the deletions made that day of older backups.
_DAY_EVENTS = """
INSERT INTO events (at, kind, policy_id, run_id, job_id, image_id, account, region, instance_id,
                    reason, details)
SELECT at, kind, policy_id, run_id, job_id, image_id, account, region, instance_id, reason,
       details::jsonb
FROM (
    SELECT j.slot + interval '1 minute' AS at, 'job.attempt' AS kind, j.policy_id, j.run_id,
           j.id AS job_id, j.image_id, j.account, j.region, j.instance_id, NULL AS reason,
           format('{"outcome": "created", "request_id": "%s"}', j.last_request_id) AS details
    FROM runs r JOIN jobs j ON j.run_id = r.id WHERE r.slot = $1
    UNION ALL
    SELECT j.slot + interval '10 minutes', 'job.succeeded', j.policy_id, j.run_id, j.id,
           j.image_id, j.account, j.region, j.instance_id, 'image_ready', '{}'
    FROM runs r JOIN jobs j ON j.run_id = r.id WHERE r.slot = $1
    UNION ALL
    SELECT j.slot + interval '11 minutes', 'retention.kept', j.policy_id, NULL, j.id,
           j.image_id, j.account, j.region, j.instance_id,
           format('daily %s', to_char(j.slot, 'YYYY-MM-DD')), '{}'
    FROM runs r JOIN jobs j ON j.run_id = r.id, generate_series(1, $3) AS k
    WHERE r.slot = $1 AND $3 > 0
    UNION ALL
    SELECT i.delete_requested_at + (s.n * interval '1 second'), s.kind, i.policy_id, NULL,
           i.job_id, i.image_id, i.account, i.region, i.instance_id, i.delete_reason, '{}'
    FROM runs r JOIN jobs j ON j.run_id = r.id JOIN images i ON i.job_id = j.id,
         (VALUES (0, 'retention.delete_requested'), (1, 'retention.delete_sent'),
                 (60, 'retention.deleted')) AS s(n, kind)
    WHERE r.slot = $2 AND i.deleted_at IS NOT NULL
) AS day
ORDER BY at
"""


async def generate(conn: Any, sh: Shape, *, history: bool) -> dict[str, Any]:
    """Write the fleet's rows into an empty, migrated database; counts and seconds taken."""
    started = time.monotonic()
    ages = list(range(sh.days + 1)) if history else [0, *sh.kept]
    await conn.execute(_POLICIES, REGION, sh.instances, INSTANCES_PER_POLICY, *_rules(RULES))
    await conn.execute(_INSTANCES)
    await conn.execute(_RUNS, sh.today, ages)
    await conn.execute(_JOBS, ACCOUNT, REGION)
    await conn.execute(_IMAGES, sh.today, IMAGE_AFTER, DELETED_AFTER, list(sh.kept))
    # Retention after each backup records a keep per live image: about as many as it keeps.
    keeps = len(sh.kept) if history else 0
    # Day by day, oldest first: ledger ids grow with time, as when the daemon writes them.
    for age in sorted(ages, reverse=True):
        slot = sh.today - timedelta(days=age)
        await conn.execute(_RUN_EVENTS, slot)
        if age:
            await conn.execute(_DAY_EVENTS, slot, slot - DELETED_AFTER, keeps)
    await conn.execute("DROP TABLE bench_instances")
    return {"rows": await counts(conn), "seconds": round(time.monotonic() - started, 1)}


def _rules(rules: retention.Rules) -> Sequence[int | None]:
    return (rules.keep_daily, rules.keep_weekly, rules.keep_monthly, rules.max_age_days)


async def counts(conn: Any) -> dict[str, int]:
    """Rows per table the history benchmark is about."""
    found = {}
    for table in ("runs", "jobs", "images", "events"):
        found[table] = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    found["live_images"] = int(
        await conn.fetchval("SELECT count(*) FROM images WHERE deleted_at IS NULL")
    )
    return found
