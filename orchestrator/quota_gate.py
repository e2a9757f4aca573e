"""The quota gate: while a region's image quota is known full, its jobs wait instead of calling.

Without it every job of a full region retried CreateImage on its own backoff and each call
answered `ImageQuotaLimitExceeded`: wasted budget of an API shared by the whole account. The gate
is a `quota_gates` row per (account, region), so every replica sees it:

- closed when rotation could free nothing yet (our newest images are still being built);
  jobs arriving then are parked durably (`next_attempt_at`), never held in memory;
- nudged when one of our images in the region settles or is deleted (rotation.py), or reopened
  by a bounded backoff: one job then probes, measuring the room with DescribeImageQuota and
  DescribeImages instead of a CreateImage, and rotates if the region is still full;
- opened for as many jobs as there is room (tokens), or removed once the room fits every
  waiting job. Exhaustion (nothing of ours can ever go) removes it: each job then finds out by
  its own call and fails as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator import jobs, logs
from orchestrator.context import EngineContext
from orchestrator.jobs import Job
from orchestrator.tencent.errors import TencentError
from orchestrator.tencent.models import Filter

log = logs.get("quota_gate")

Conn = Any  # an asyncpg connection (pool proxies included)

_PRIVATE = (Filter("image-type", ("PRIVATE_IMAGE",)),)

# Jobs still needing room: not yet sure to have called CreateImage successfully.
_WAITING = """
SELECT count(*) FROM jobs
WHERE account = $1 AND region = $2 AND state IN ('pending', 'claimed')
"""

# Jobs parked behind the gate: released and not due yet, their latest ledger row a quota wait
# (so a job backing off from a busy instance or a transient error keeps its own backoff).
_WAKE = """
UPDATE jobs SET next_attempt_at = now(), updated_at = now()
WHERE id IN (SELECT j.id FROM jobs j
             WHERE j.account = $1 AND j.region = $2 AND j.state = 'pending'
               AND j.lease_owner IS NULL AND j.next_attempt_at > now()
               AND (SELECT e.details->>'outcome' FROM events e WHERE e.job_id = j.id
                    ORDER BY e.id DESC LIMIT 1) IN ('quota_gated', 'quota_wait')
             ORDER BY j.next_attempt_at, j.id
             LIMIT $3
             FOR UPDATE OF j SKIP LOCKED)
"""

_LOCK = "SELECT *, now() AS now FROM quota_gates WHERE account = $1 AND region = $2 FOR UPDATE"

# A closure while the gate is still closed changes nothing but the picture: a burst of quota
# errors from calls already in flight must not grow the backoff, only a failed probe does.
_CLOSE = """
INSERT INTO quota_gates (account, region, reopen_at)
VALUES ($1, $2, now() + make_interval(secs => $3))
ON CONFLICT (account, region) DO UPDATE SET
    closed_at = now(),
    closures = CASE WHEN quota_gates.reopen_at <= now() THEN quota_gates.closures + 1
                    ELSE quota_gates.closures END,
    reopen_at = CASE WHEN quota_gates.reopen_at <= now()
                     THEN now() + make_interval(secs => least($4, $3 * 2 ^ quota_gates.closures))
                     ELSE quota_gates.reopen_at END,
    tokens = 0, probe_job = NULL, probe_until = NULL
RETURNING reopen_at, closures
"""

_TOKENS = """
INSERT INTO quota_gates (account, region, reopen_at, tokens) VALUES ($1, $2, now(), $3)
ON CONFLICT (account, region) DO UPDATE SET
    tokens = $3, closures = 1, reopen_at = now(), probe_job = NULL, probe_until = NULL
"""

# Whatever the gate's state, a settled image is the moment room may appear: a probe may go.
_NUDGE = """
UPDATE quota_gates SET reopen_at = least(reopen_at, now())
WHERE account = $1 AND region = $2
RETURNING 1
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    """May a job call CreateImage now (`until` None), and why (open, token, probe, closed...)."""

    until: datetime | None
    why: str


@dataclass(frozen=True, slots=True)
class Room:
    """What making room did: images freed, or the gate closed until `reopen_at`, or exhausted."""

    freed: int = 0
    exhausted: bool = False
    reopen_at: datetime | None = None


GO = Verdict(None, "open")


def judge(gate: Any, job_id: int) -> Verdict:
    """Pure: what the gate row says to one job (the row carries the database's `now`)."""
    now = gate["now"]
    if gate["tokens"] > 0:
        return Verdict(None, "token")
    probing = gate["probe_job"] is not None and gate["probe_until"] > now
    if probing and gate["probe_job"] != job_id:
        return Verdict(gate["probe_until"], "probing")
    if probing or gate["reopen_at"] <= now:
        return Verdict(None, "probe")
    return Verdict(gate["reopen_at"], "closed")


async def admit(ctx: EngineContext, job: Job) -> Verdict:
    """Whether `job` may call CreateImage now; when not, until when it should wait."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        gate = await conn.fetchrow(_LOCK, job.account, job.region)
        if gate is None:
            return GO
        verdict = judge(gate, job.id)
        await _take(conn, job, verdict, ctx.settings.lease_seconds)
    if verdict.why != "probe":
        return verdict
    return await _probe(ctx, job)


async def _take(conn: Conn, job: Job, verdict: Verdict, lease: float) -> None:
    if verdict.why == "token":
        await conn.execute(
            "UPDATE quota_gates SET tokens = tokens - 1 WHERE account = $1 AND region = $2",
            job.account,
            job.region,
        )
    elif verdict.why == "probe":
        # Claimed like a lease: a probe that dies lapses and the next job probes instead.
        await conn.execute(
            "UPDATE quota_gates SET probe_job = $3, probe_until = now() + make_interval(secs => $4)"
            " WHERE account = $1 AND region = $2",
            job.account,
            job.region,
            job.id,
            lease,
        )


async def measure_room(ctx: EngineContext, account: str, region: str) -> int:
    """Free custom-image quota in a region: DescribeImageQuota minus the images there."""
    client = ctx.client(account)
    quota = await client.describe_image_quota(region)
    page = await client.describe_images(region, filters=_PRIVATE, limit=1)
    return quota - page.total_count


async def _probe(ctx: EngineContext, job: Job) -> Verdict:
    if job.on_quota == "rotate":
        # Rotation measures the room itself (listing lag and DELETING images included) and
        # frees what the waiting jobs lack.
        made = await make_room(ctx, job, taken=1)
        return Verdict(made.reopen_at, "closed" if made.reopen_at else "probe")
    try:
        room = await measure_room(ctx, job.account, job.region)
    except TencentError as exc:
        # Cannot tell: let this one job find out by calling; the others stay parked.
        log.warning("quota.probe_failed", region=job.region, code=exc.code, message=exc.message)
        return Verdict(None, "probe")
    log.info("quota.probed", account=job.account, region=job.region, room=room)
    if room > 0:
        await open_room(ctx, job.account, job.region, room, taken=1)
    return Verdict(None, "probe")  # CreateImage answers, and the job fails as the policy says


async def waiting(ctx: EngineContext, account: str, region: str) -> int:
    """How many jobs of the region still need room for an image."""
    return int(await ctx.pool.fetchval(_WAITING, account, region) or 0)


async def make_room(ctx: EngineContext, job: Job, *, taken: int = 0) -> Room:
    """Rotate for the jobs needing room in the job's region; open the gate for the room there
    is now, or close it until deletions under way are confirmed.

    `taken`: how much of the room the caller uses at once (1 when it calls CreateImage next).
    """
    from orchestrator import rotation  # rotation nudges the gate: imported late, no cycle

    account, region = job.account, job.region
    result = await rotation.rotate_for_quota(
        ctx, account, region, job_id=job.id, policy_id=job.policy_id
    )
    if result.room > 0:
        await open_room(ctx, account, region, result.room, taken=taken)
        return Room(freed=result.room)
    if result.exhausted:
        await forget(ctx, account, region)
        return Room(exhausted=True)
    return Room(reopen_at=await close(ctx, account, region))


async def close(ctx: EngineContext, account: str, region: str) -> datetime:
    """The region is full and nothing can go yet: close its gate; when a probe may go."""
    retry = ctx.settings.retry
    row: Any = await ctx.pool.fetchrow(_CLOSE, account, region, retry.busy_base, retry.max_delay)
    log.info(
        "quota.gate_closed",
        account=account,
        region=region,
        reopen_at=row["reopen_at"].isoformat(),
        closures=row["closures"],
    )
    reopen: datetime = row["reopen_at"]
    return reopen


async def open_room(
    ctx: EngineContext, account: str, region: str, room: int, *, taken: int = 0
) -> None:
    """`room` images fit: let that many jobs go (the gate goes once every waiting job fits)."""
    waiting_jobs = await waiting(ctx, account, region)
    async with ctx.pool.acquire() as conn, conn.transaction():
        if room >= waiting_jobs:
            await conn.execute(
                "DELETE FROM quota_gates WHERE account = $1 AND region = $2", account, region
            )
        else:
            await conn.execute(_TOKENS, account, region, room - taken)
        woken = await _wake(conn, account, region, max(room - taken, 0))
    log.info(
        "quota.gate_opened",
        account=account,
        region=region,
        room=room,
        waiting=waiting_jobs,
        woken=woken,
    )


async def forget(ctx: EngineContext, account: str, region: str) -> None:
    """Remove the region's gate (nothing of ours can ever free room there)."""
    await ctx.pool.execute(
        "DELETE FROM quota_gates WHERE account = $1 AND region = $2", account, region
    )


async def nudge(conn: Conn, account: str, region: str) -> bool:
    """One of our images in the region settled or was deleted: room may exist; wake one probe."""
    if await conn.fetchval(_NUDGE, account, region) is None:
        return False
    await _wake(conn, account, region, 1)
    log.debug("quota.gate_nudged", account=account, region=region)
    return True


async def _wake(conn: Conn, account: str, region: str, limit: int) -> int:
    """Make up to `limit` parked jobs due now and tell the dispatchers; how many woke."""
    woken = int((await conn.execute(_WAKE, account, region, limit)).split()[-1])
    if woken:
        await jobs.notify_due(conn)
    return woken
