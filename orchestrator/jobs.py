"""Job-state SQL: claim under a lease, heartbeat, and every transition the dispatcher records.

Every write after the claim is guarded by `lease_owner = $me`: a worker whose lease was taken
over (it stalled past `lease_seconds`) must not overwrite what the new owner decided. Such a
write changes nothing and returns False; the caller drops the job.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

LIVE_STATES = ("pending", "claimed", "creating", "waiting_image")
# NOTIFY channel: jobs became due now (a run was created, parked jobs were woken). Dispatchers
# listening look for work at once instead of at their next poll; only lease holders claim.
JOBS_DUE_CHANNEL = "cvm_backup_jobs_due"
TERMINAL_STATES = ("succeeded", "failed", "expired", "skipped")

# One statement claims due jobs and reclaims jobs whose lease expired (their owner died), so no
# separate reaper is needed: recovery never waits for a task that might not be running.
_CLAIM = """
WITH due AS (
    -- Due: released jobs whose retry time has come, or held jobs whose owner stopped renewing.
    -- 'creating' survives a release on purpose: its next owner resolves the name first.
    SELECT id FROM jobs
    WHERE state IN ('pending', 'claimed', 'creating')
      AND ((lease_owner IS NULL AND next_attempt_at <= now()) OR lease_expires_at < now())
      -- A paused account's jobs stay put (orchestrator.pauses): no statement per claim for it.
      -- A pause covers the whole account (scope_region NULL) or one region (a CAM denial).
      AND NOT EXISTS (SELECT 1 FROM account_pauses ap
                      WHERE ap.account = jobs.account
                        AND (ap.scope_region IS NULL OR ap.scope_region = jobs.region))
      AND ($4::bigint IS NULL OR run_id = $4)
      -- Only accounts whose lease this replica holds (NULL: every account).
      AND ($5::text[] IS NULL OR account = ANY($5::text[]))
      -- Never a job this process still works on: its lease may have run out while its task
      -- waits (at the limiter, on a stalled call); a second task would race the first.
      AND NOT (id = ANY($6::bigint[]))
    ORDER BY next_attempt_at, id
    LIMIT $2
    -- Rows another worker is claiming right now are skipped, not waited for.
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs AS j
SET state = CASE WHEN j.state = 'pending' THEN 'claimed' ELSE j.state END,
    lease_owner = $1,
    lease_expires_at = now() + make_interval(secs => $3),
    updated_at = now()
FROM due, policies AS p
WHERE j.id = due.id AND p.id = j.policy_id
RETURNING j.id, j.run_id, j.policy_id, j.account, j.region, j.instance_id, j.slot,
          j.image_name, j.state, j.attempts, j.deadline, j.image_id, j.last_error_code,
          j.kind, j.source_image_id, j.source_region,
          p.name AS policy_name, p.enabled, p.force_poweroff, p.sysprep,
          p.include_data_disks, p.on_quota,
          -- Whether the region's quota gate is closed (orchestrator.quota_gate): only then
          -- does the job consult it, so an open region costs no statement per job.
          EXISTS (SELECT 1 FROM quota_gates g
                  WHERE g.account = j.account AND g.region = j.region) AS gated
"""


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed job and the policy options its CreateImage call needs."""

    id: int
    run_id: int
    policy_id: int
    account: str
    region: str
    instance_id: str
    slot: datetime
    image_name: str
    state: str  # as claimed: 'claimed' (no call made yet) or 'creating' (a call may have been)
    attempts: int
    deadline: datetime
    image_id: str | None
    last_error_code: str | None
    policy_name: str
    enabled: bool
    force_poweroff: bool
    sysprep: bool
    include_data_disks: bool
    on_quota: str
    gated: bool = False  # the region's quota gate was closed when the job was claimed
    # 'backup' (CreateImage in `region`) or 'copy' (SyncImages of `source_image_id`, which
    # lives in `source_region`, to `region`).
    kind: str = "backup"
    source_image_id: str | None = None
    source_region: str | None = None


async def notify_due(conn: Any) -> None:
    """Tell every listening dispatcher that jobs are due (delivered when the caller commits)."""
    await conn.execute("SELECT pg_notify($1, '')", JOBS_DUE_CHANNEL)


async def claim(
    pool: asyncpg.Pool,
    owner: str,
    limit: int,
    lease_seconds: float,
    *,
    run_id: int | None = None,
    accounts: Collection[str] | None = None,
    busy: Collection[int] = (),
) -> list[Job]:
    """Claim up to `limit` due jobs for `owner`: accounts not paused, of `accounts` if given.

    Jobs in `busy` (this process's tasks still hold them) are never claimed again.
    """
    held = None if accounts is None else sorted(accounts)
    rows = await pool.fetch(_CLAIM, owner, limit, lease_seconds, run_id, held, sorted(busy))
    return [Job(**dict(row)) for row in rows]


async def renew(
    pool: asyncpg.Pool, owner: str, ids: Sequence[int], lease_seconds: float
) -> set[int]:
    """Extend the leases of jobs in flight in one statement; the ids that were still ours."""
    rows = await pool.fetch(
        "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3)"
        " WHERE id = ANY($1::bigint[]) AND lease_owner = $2 RETURNING id",
        list(ids),
        owner,
        lease_seconds,
    )
    return {row["id"] for row in rows}


async def release(pool: asyncpg.Pool, owner: str, ids: Sequence[int]) -> int:
    """Give unfinished jobs back: due now, 'claimed' back to 'pending', 'creating' kept."""
    result = await pool.execute(
        "UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = now(),"
        " state = CASE WHEN state = 'claimed' THEN 'pending' ELSE state END, updated_at = now()"
        " WHERE id = ANY($1::bigint[]) AND lease_owner = $2 AND state IN ('claimed', 'creating')",
        list(ids),
        owner,
    )
    return int(result.split()[-1])


async def mark_creating(conn: Any, owner: str, ids: Sequence[int]) -> set[int]:
    """Record, before CreateImage, that calls with these jobs' names may reach Tencent.

    One statement for a whole group (orchestrator.db.batch); the ids still leased to `owner`.
    """
    rows = await conn.fetch(
        "UPDATE jobs SET state = 'creating', updated_at = now()"
        " WHERE id = ANY($1::bigint[]) AND lease_owner = $2 AND state IN ('claimed', 'creating')"
        " RETURNING id",
        list(ids),
        owner,
    )
    return {row["id"] for row in rows}


async def retry_later(
    conn: Any,
    job: Job,
    owner: str,
    *,
    when: datetime,
    state: str,
    count_attempt: bool,
    error: tuple[str, str, str | None] | None,
) -> bool:
    """Release the job until `when`; `state` is 'pending' (no image) or 'creating' (maybe one)."""
    code, message, request_id = error or (None, None, None)
    status = await conn.execute(
        "UPDATE jobs SET state = $3, next_attempt_at = $4, attempts = attempts + $5,"
        " lease_owner = NULL, lease_expires_at = NULL, updated_at = now(),"
        " last_error_code = coalesce($6, last_error_code),"
        " last_error_message = coalesce($7, last_error_message),"
        " last_request_id = coalesce($8, last_request_id)"
        " WHERE id = $1 AND lease_owner = $2",
        job.id,
        owner,
        state,
        when,
        1 if count_attempt else 0,
        code,
        message,
        request_id,
    )
    return bool(status == "UPDATE 1")


async def finish(
    conn: Any,
    job: Job,
    owner: str,
    state: str,
    *,
    reason: str | None = None,
    error: tuple[str, str, str | None] | None = None,
    count_attempt: bool = False,
) -> bool:
    """Move the job to a terminal state (failed, expired, skipped) with its reason or error."""
    code, message, request_id = error or (None, None, None)
    status = await conn.execute(
        "UPDATE jobs SET state = $3, reason = $4, finished_at = now(), updated_at = now(),"
        " lease_owner = NULL, lease_expires_at = NULL, attempts = attempts + $8,"
        " last_error_code = coalesce($5, last_error_code),"
        " last_error_message = coalesce($6, last_error_message),"
        " last_request_id = coalesce($7, last_request_id)"
        " WHERE id = $1 AND lease_owner = $2",
        job.id,
        owner,
        state,
        reason,
        code,
        message,
        request_id,
        1 if count_attempt else 0,
    )
    return bool(status == "UPDATE 1")


# One statement for a whole group of jobs (orchestrator.db.batch): each job waits for the
# tracker, its image is recorded as ours, and its attempt goes to the ledger; all or nothing, and
# nothing for a job whose lease was lost. Details travel as text: asyncpg has no jsonb[] codec.
_RECORD_IMAGES = """
WITH r AS (
    SELECT * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[])
        AS r(job_id, image_id, request_id, image_state, details)
), j AS (
    UPDATE jobs SET state = 'waiting_image', image_id = r.image_id, lease_owner = NULL,
                    lease_expires_at = NULL, updated_at = now(),
                    last_request_id = coalesce(r.request_id, last_request_id)
    FROM r
    WHERE jobs.id = r.job_id AND jobs.lease_owner = $1
    RETURNING jobs.id, jobs.run_id, jobs.policy_id, jobs.account, jobs.region, jobs.instance_id,
              jobs.slot, jobs.image_name, jobs.source_image_id, r.image_id, r.image_state,
              r.details
), i AS (
    INSERT INTO images (image_id, name, account, region, instance_id, policy_id, slot, job_id,
                        state, source_image_id)
    SELECT image_id, image_name, account, region, instance_id, policy_id, slot, id, image_state,
           source_image_id
    FROM j
    ON CONFLICT (image_id) DO NOTHING
), e AS (
    INSERT INTO events (kind, policy_id, run_id, job_id, image_id, account, region,
                        instance_id, details)
    SELECT 'job.attempt', policy_id, run_id, id, image_id, account, region, instance_id,
           details::jsonb
    FROM j
)
SELECT id FROM j
"""


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """A job's image, known after CreateImage or a lookup by name, and its ledger details."""

    job_id: int
    image_id: str
    image_state: str
    request_id: str | None
    attempt: dict[str, Any]  # the `job.attempt` ledger row's details


async def record_images(conn: Any, owner: str, records: Sequence[ImageRecord]) -> set[int]:
    """Jobs wait for the tracker, their images are ours, attempts logged; ids still ours."""
    rows = await conn.fetch(
        _RECORD_IMAGES,
        owner,
        [r.job_id for r in records],
        [r.image_id for r in records],
        [r.request_id for r in records],
        [r.image_state for r in records],
        [json.dumps({k: v for k, v in r.attempt.items() if v is not None}) for r in records],
    )
    return {row["id"] for row in rows}


async def event(conn: Any, kind: str, job: Job, **details: Any) -> None:
    """Append one row to the events ledger about `job` (attempts, outcomes, decisions)."""
    image_id = details.pop("image_id", None) or job.image_id
    reason = details.pop("reason", None)
    await conn.execute(
        "INSERT INTO events (kind, policy_id, run_id, job_id, image_id, account, region,"
        " instance_id, reason, details) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        kind,
        job.policy_id,
        job.run_id,
        job.id,
        image_id,
        job.account,
        job.region,
        job.instance_id,
        reason,
        # The pool's jsonb codec encodes the dict (orchestrator.db.pool.init_connection).
        {k: v for k, v in details.items() if v is not None},
    )


# Jobs of a paused account or region wait for the prober (orchestrator.pauses), not for a time.
_NOT_PAUSED = (
    " AND NOT EXISTS (SELECT 1 FROM account_pauses ap WHERE ap.account = jobs.account"
    " AND (ap.scope_region IS NULL OR ap.scope_region = jobs.region))"
)


async def next_due(pool: asyncpg.Pool, accounts: Collection[str] | None = None) -> datetime | None:
    """When the next released job becomes due, or the next lease expires; None when idle."""
    value = await pool.fetchval(
        "SELECT min(coalesce(lease_expires_at, next_attempt_at)) FROM jobs"
        " WHERE state IN ('pending', 'claimed', 'creating')"
        " AND ($1::text[] IS NULL OR account = ANY($1::text[]))" + _NOT_PAUSED,
        None if accounts is None else sorted(accounts),
    )
    return value if isinstance(value, datetime) else None


async def live_count(pool: asyncpg.Pool, *, run_id: int | None = None) -> int:
    """Jobs not yet terminal (of one run, or all), outside paused accounts: zero means drained."""
    # finished_at IS NULL: live, and what jobs_live_idx (0011) covers, however long the history.
    value = await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE finished_at IS NULL"
        " AND ($1::bigint IS NULL OR run_id = $1)" + _NOT_PAUSED,
        run_id,
    )
    return int(value or 0)


# Jobs whose window closed while nobody could claim them (their account paused, or driven by no
# replica): they made no call, so they expire here without the API. A job that may have called
# ('creating') is left to its next owner, who resolves its name first.
_EXPIRE_OVERDUE = """
WITH x AS (
    UPDATE jobs SET state = 'expired', reason = 'window_closed', finished_at = now(),
                    updated_at = now()
    WHERE state = 'pending' AND lease_owner IS NULL AND deadline <= now()
    RETURNING id, run_id, policy_id, account, region, instance_id
), e AS (
    INSERT INTO events (kind, policy_id, run_id, job_id, account, region, instance_id, reason,
                        details)
    SELECT 'job.expired', policy_id, run_id, id, account, region, instance_id, 'window_closed',
           '{"outcome": "expired", "by": "sweeper"}'::jsonb
    FROM x
)
SELECT id, account, instance_id FROM x
"""


async def expire_overdue(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """Expire unclaimed jobs past their deadline (a ledger row each); the jobs expired."""
    return await pool.fetch(_EXPIRE_OVERDUE)


async def complete_runs(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """Mark runs whose every job is terminal as completed; the runs just completed, with tallies."""
    return await pool.fetch(
        """
        UPDATE runs AS r SET state = 'completed', completed_at = now()
        WHERE r.state = 'running'
          AND NOT EXISTS (SELECT 1 FROM jobs j
                          WHERE j.run_id = r.id AND j.state = ANY($1::text[]))
        RETURNING r.id, r.policy_id, r.slot,
          (SELECT jsonb_object_agg(s.state, s.n) FROM
             (SELECT state, count(*) AS n FROM jobs WHERE run_id = r.id GROUP BY state) AS s)
          AS tally
        """,
        list(LIVE_STATES),
    )


# A backup that succeeded makes its copies due: a job per destination of its policy, in the
# transaction that records the success, so its run stays open until the copies end too. The
# window of a copy starts now: it could not start before its source was NORMAL. It is due as
# of its slot, before any backup of that slot (those are due from when the scheduler made them,
# after the slot), so the claim, ordered by due time, takes it before the slot's backups still
# waiting: a copy waits on SyncImages' own limit, not behind CreateImage's queue (at 300
# instances that queue is half a minute). A slot still ahead (a run made early, as the demo
# does) is no due time: then it is due as of its backup job's making.
_SCHEDULE_COPIES = """
INSERT INTO jobs (run_id, policy_id, account, region, instance_id, slot, image_name, deadline,
                  kind, source_image_id, source_region, next_attempt_at)
SELECT j.run_id, j.policy_id, j.account, d.region, j.instance_id, j.slot, j.image_name,
       now() + p.completion_window, 'copy', j.image_id, j.region, least(j.slot, j.created_at)
FROM jobs j
JOIN policies p ON p.id = j.policy_id
CROSS JOIN LATERAL jsonb_to_recordset(p.copies) AS d(region text)
WHERE j.id = ANY($1::bigint[]) AND j.kind = 'backup' AND j.image_id IS NOT NULL
  AND d.region IS NOT NULL AND d.region <> j.region
ON CONFLICT DO NOTHING
RETURNING id, region, source_image_id
"""


async def schedule_copies(conn: Any, backup_ids: Sequence[int]) -> list[asyncpg.Record]:
    """The copy jobs of backups that just succeeded (none for a policy without copies)."""
    if not backup_ids:
        return []
    rows: list[asyncpg.Record] = await conn.fetch(_SCHEDULE_COPIES, list(backup_ids))
    if rows:
        await notify_due(conn)
    return rows
