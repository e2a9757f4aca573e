"""The claim statement: SKIP LOCKED, leases, reclaiming dead owners, heartbeat and release."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg

from orchestrator import jobs, pauses, scheduler
from orchestrator.db import policies as policy_rows
from orchestrator.scheduler import Targets
from orchestrator.tencent.errors import TencentError
from tests.fixtures.engine import insert_policy

IDS = tuple(f"ins-claim{i:03d}" for i in range(10))


async def _seed(pool: asyncpg.Pool, count: int = 10) -> int:
    await insert_policy(pool, "claims", instance_ids=IDS[:count])
    policy = await policy_rows.fetch_policy(pool, "claims")
    assert policy is not None
    slot = datetime.now(UTC).replace(second=0, microsecond=0)
    run = await scheduler.create_run(pool, policy, slot, Targets(IDS[:count], ()), "manual")
    return run.run_id


async def _age_leases(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '1 second'"
        " WHERE lease_owner IS NOT NULL"
    )


async def test_concurrent_claimers_get_disjoint_jobs(pg_pool: asyncpg.Pool) -> None:
    """Two workers claiming at once never get the same job (FOR UPDATE SKIP LOCKED)."""
    await _seed(pg_pool)
    a, b = await asyncio.gather(jobs.claim(pg_pool, "a", 6, 30), jobs.claim(pg_pool, "b", 6, 30))
    ids_a, ids_b = {j.id for j in a}, {j.id for j in b}
    assert not ids_a & ids_b
    assert len(ids_a | ids_b) == 10
    assert await jobs.claim(pg_pool, "c", 10, 30) == []


async def test_expired_lease_is_reclaimed_by_the_next_claim(pg_pool: asyncpg.Pool) -> None:
    """A dead owner's jobs come back after lease expiry, with no reaper; 'creating' is kept."""
    await _seed(pg_pool, 2)
    first, second = await jobs.claim(pg_pool, "dead", 2, 30)
    assert await jobs.mark_creating(pg_pool, "dead", [first.id]) == {first.id}
    assert await jobs.claim(pg_pool, "alive", 2, 30) == []
    await _age_leases(pg_pool)
    taken = {j.id: j.state for j in await jobs.claim(pg_pool, "alive", 2, 30)}
    assert taken == {first.id: "creating", second.id: "claimed"}
    # The dead owner can no longer write: its lease was taken over.
    assert await jobs.mark_creating(pg_pool, "dead", [first.id, second.id]) == set()


async def test_heartbeat_renews_only_own_leases(pg_pool: asyncpg.Pool) -> None:
    """One batched UPDATE extends the leases a worker still holds, and only those."""
    await _seed(pg_pool, 3)
    mine = await jobs.claim(pg_pool, "me", 2, 1)
    other = await jobs.claim(pg_pool, "other", 1, 1)
    renewed = await jobs.renew(pg_pool, "me", [j.id for j in [*mine, *other]], 60)
    assert renewed == {j.id for j in mine}
    await pg_pool.execute("SELECT pg_sleep(1.1)")
    assert [j.id for j in await jobs.claim(pg_pool, "thief", 3, 30)] == [other[0].id]


async def test_a_claim_skips_the_jobs_this_process_still_works_on(pg_pool: asyncpg.Pool) -> None:
    """An expired lease of a job in `busy` is not reclaimed; the same job is for another."""
    await _seed(pg_pool, 2)
    first = await jobs.claim(pg_pool, "me", 2, 0.1)
    await pg_pool.execute("SELECT pg_sleep(0.2)")
    again = await jobs.claim(pg_pool, "me", 2, 30, busy=[first[0].id])
    assert [j.id for j in again] == [first[1].id]
    # Another process may take it over: the fence keeps the stalled task from calling.
    assert [j.id for j in await jobs.claim(pg_pool, "other", 2, 30)] == [first[0].id]


async def test_release_returns_jobs_due_now(pg_pool: asyncpg.Pool) -> None:
    """Released jobs are due at once: 'claimed' goes back to 'pending', 'creating' stays."""
    await _seed(pg_pool, 2)
    first, second = await jobs.claim(pg_pool, "me", 2, 30)
    async with pg_pool.acquire() as conn:
        await jobs.mark_creating(conn, "me", [first.id])
    assert await jobs.release(pg_pool, "me", [first.id, second.id]) == 2
    rows = await pg_pool.fetch("SELECT id, state, lease_owner FROM jobs ORDER BY id")
    assert [(r["state"], r["lease_owner"]) for r in rows] == [("creating", None), ("pending", None)]
    assert len(await jobs.claim(pg_pool, "next", 5, 30)) == 2


async def test_claim_skips_paused_accounts_and_future_retries(pg_pool: asyncpg.Pool) -> None:
    """Jobs of a paused account and jobs whose retry time has not come are left alone."""
    await _seed(pg_pool, 2)
    later = datetime.now(UTC) + timedelta(hours=1)
    await pg_pool.execute(
        "UPDATE jobs SET next_attempt_at = $1 WHERE instance_id = $2", later, IDS[0]
    )
    refused = TencentError("AuthFailure.SignatureFailure", "bad signature", "req-1")
    await pauses.pause(
        pg_pool, "default", refused, region="ap-guangzhou", instance_id=IDS[1], first_probe=60
    )
    assert await jobs.claim(pg_pool, "me", 5, 30) == []
    assert await pauses.resume(pg_pool, "default", "operator") is not None
    assert [j.instance_id for j in await jobs.claim(pg_pool, "me", 5, 30)] == [IDS[1]]
    assert await jobs.next_due(pg_pool) is not None


async def test_record_images_applies_only_jobs_still_leased(pg_pool: asyncpg.Pool) -> None:
    """One grouped write records images and ledger rows, skipping a job whose lease was lost."""
    await _seed(pg_pool, 2)
    kept, lost = await jobs.claim(pg_pool, "me", 2, 30)
    await _age_leases(pg_pool)
    await jobs.claim(pg_pool, "thief", 1, 30)  # takes the oldest lease: `kept`'s
    records = [
        jobs.ImageRecord(job.id, f"img-grp{job.id:05d}", "CREATING", "req-1", {"outcome": "x"})
        for job in (kept, lost)
    ]
    applied = await jobs.record_images(pg_pool, "me", records)
    assert applied == {lost.id}
    images = await pg_pool.fetch("SELECT image_id, job_id FROM images")
    assert [(r["image_id"], r["job_id"]) for r in images] == [(f"img-grp{lost.id:05d}", lost.id)]
    ledger = await pg_pool.fetchval(
        "SELECT details FROM events WHERE kind = 'job.attempt' AND job_id = $1", lost.id
    )
    assert ledger == {"outcome": "x"}


async def test_unclaimed_jobs_past_their_window_expire_without_an_owner(
    pg_pool: asyncpg.Pool,
) -> None:
    """Pending jobs past the deadline expire with a ledger row; leased or 'creating' ones wait."""
    await _seed(pg_pool, 3)
    leased, maybe_called = await jobs.claim(pg_pool, "me", 2, 30)
    await jobs.mark_creating(pg_pool, "me", [maybe_called.id])
    await jobs.release(pg_pool, "me", [maybe_called.id])
    await pg_pool.execute("UPDATE jobs SET deadline = now() - interval '1 second'")
    expired = [row["id"] for row in await jobs.expire_overdue(pg_pool)]
    rows = await pg_pool.fetch("SELECT id, state FROM jobs ORDER BY id")
    states = {r["id"]: r["state"] for r in rows}
    assert states.pop(leased.id) == "claimed"
    assert states.pop(maybe_called.id) == "creating"
    assert list(states.values()) == ["expired"]
    assert expired == list(states)
    kinds = await pg_pool.fetch("SELECT kind, reason FROM events WHERE job_id = $1", expired[0])
    assert [(k["kind"], k["reason"]) for k in kinds] == [("job.expired", "window_closed")]
    assert await jobs.expire_overdue(pg_pool) == []
