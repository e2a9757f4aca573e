"""Retention sweeps and quota rotation against real Postgres and the real simulator."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

import asyncpg
from structlog.testing import capture_logs

from orchestrator import rotation
from orchestrator.context import EngineContext
from orchestrator.db import pool
from orchestrator.simulator.config import Faults
from orchestrator.simulator.runner import Simulator
from tests.engine_parts.helpers import (
    ACCOUNT,
    FAILING,
    INSTANCES,
    NOW,
    REGION,
    add_job,
    add_policy,
    add_waiting,
    alive,
    deleted_ids,
    events,
    fill_quota,
    foreign_alive,
    history,
    make_image,
    record_image,
)
from tests.fixtures.sim import SimClock

A, B, C = INSTANCES


async def test_retention_deletes_what_the_rules_let_go(
    engine: EngineContext, simulator: Simulator
) -> None:
    """keep_last 2 of 4: the two oldest go, with snapshots, and every decision is in the ledger."""
    policy = await add_policy(engine.pool, keep_last=2)
    ids = await history(engine, policy, A, 4)
    other = await history(engine, policy, B, 3)
    deleted = await rotation.apply_retention(engine, policy, A)
    assert sorted(deleted) == sorted(ids[:2])
    assert deleted_ids(simulator) == ids[:2]
    assert all(d.delete_binded_snap for d in simulator.state.deletions)
    assert all(alive(simulator, i) for i in ids[2:] + other)
    assert foreign_alive(simulator)
    rows = await engine.pool.fetch(
        "SELECT image_id FROM images WHERE deleted_at IS NOT NULL ORDER BY image_id"
    )
    assert [r["image_id"] for r in rows] == sorted(ids[:2])
    kept = {r["image_id"]: r["reason"] for r in await events(engine.pool, "retention.kept")}
    assert kept == {ids[3]: "newest NORMAL; keep_last 1/2", ids[2]: "keep_last 2/2"}
    requested = await events(engine.pool, "retention.delete_requested")
    confirmed = await events(engine.pool, "retention.deleted")
    assert [r["image_id"] for r in requested] == [r["image_id"] for r in confirmed]
    assert {r["reason"] for r in confirmed} == {"not selected by any rule"}


async def test_intent_survives_a_failed_delete_and_is_reissued(
    engine: EngineContext, simulator: Simulator
) -> None:
    """A DeleteImages that fails leaves the committed intent; the next sweep finishes it."""
    policy = await add_policy(engine.pool, keep_last=1)
    ids = await history(engine, policy, A, 2)
    simulator.set_faults(Faults(internal_error_rate=1.0), "DeleteImages")
    assert await rotation.apply_retention(engine, policy, A) == []
    row = await engine.pool.fetchrow("SELECT * FROM images WHERE image_id = $1", ids[0])
    assert row is not None
    assert row["delete_requested_at"] is not None
    assert row["deleted_at"] is None
    assert row["delete_reason"] == "not selected by any rule"
    assert alive(simulator, ids[0])
    [failed] = await events(engine.pool, "retention.delete_failed")
    assert failed["details"]["code"] == "InternalError"
    simulator.clear_faults()
    assert await rotation.apply_retention(engine, policy, A) == [ids[0]]
    assert not alive(simulator, ids[0])
    assert await engine.pool.fetchval(
        "SELECT deleted_at >= delete_requested_at FROM images WHERE image_id = $1", ids[0]
    )


async def test_refused_delete_withdraws_the_intent(
    engine: EngineContext, simulator: Simulator
) -> None:
    """An image the API refuses to delete (still being built there) is left as is."""
    policy = await add_policy(engine.pool, keep_last=1)
    simulator.state.create_delay = (60.0, 60.0)
    [old] = await history(engine, policy, A, 1)  # NORMAL in our table, CREATING at Tencent
    simulator.state.create_delay = (0.0, 0.0)
    await history(engine, policy, B, 1)
    await record_image(engine.pool, await make_image(engine, C), policy, A, NOW)
    assert await rotation.apply_retention(engine, policy, A) == []
    row = await engine.pool.fetchrow("SELECT * FROM images WHERE image_id = $1", old)
    assert row is not None
    assert (row["delete_requested_at"], row["deleted_at"]) == (None, None)
    [failed] = await events(engine.pool, "retention.delete_failed")
    assert failed["details"]["code"] == "InvalidImageId.IncorrectState"


async def test_already_gone_counts_as_deleted(engine: EngineContext, simulator: Simulator) -> None:
    """InvalidImageId.NotFound on delete confirms the deletion."""
    policy = await add_policy(engine.pool, keep_last=1)
    ids = await history(engine, policy, A, 2)
    simulator.state.delete_image(simulator.state.images[ids[0]], delete_binded_snap=True)
    assert await rotation.apply_retention(engine, policy, A) == [ids[0]]
    [confirmed] = await events(engine.pool, "retention.deleted")
    assert confirmed["details"]["already_gone"] is True


async def test_delete_binded_snap_is_configurable(
    engine: EngineContext, simulator: Simulator
) -> None:
    """With delete_binded_snap off, DeleteImages is called without the snapshots."""
    engine = replace(engine, settings=replace(engine.settings, delete_binded_snap=False))
    policy = await add_policy(engine.pool, keep_last=1)
    await history(engine, policy, A, 2)
    await rotation.apply_retention(engine, policy, A)
    assert [d.delete_binded_snap for d in simulator.state.deletions] == [False]


async def test_retention_never_touches_unfinished_images(
    engine: EngineContext, simulator: Simulator
) -> None:
    """CREATING and CREATEFAILED images are neither deleted nor counted by retention."""
    policy = await add_policy(engine.pool, keep_last=1)
    ids = await history(engine, policy, A, 2)
    simulator.state.create_delay = (60.0, 60.0)
    building = await make_image(engine, B)
    await record_image(engine.pool, building, policy, A, NOW, state="CREATING")
    await record_image(engine.pool, "img-failed01", policy, A, NOW, state="CREATEFAILED")
    assert await rotation.apply_retention(engine, policy, A) == [ids[0]]
    assert alive(simulator, building)


async def _quota_region(engine: EngineContext, simulator: Simulator) -> dict[str, list[str]]:
    """A region with every kind of image; ids by role."""
    policy = await add_policy(engine.pool, keep_last=2)
    a = await history(engine, policy, A, 4)  # a[0], a[1] beyond keep_last: retention lets go
    b = await history(engine, policy, B, 2, hours=12)  # kept by retention; b[0] evictable
    c = await history(engine, policy, C, 1)  # only one image: never evicted
    failed = await make_image(engine, FAILING)
    await record_image(
        engine.pool, failed, policy, FAILING, NOW - timedelta(1), state="CREATEFAILED"
    )
    return {"a": a, "b": b, "c": c, "failed": [failed]}


async def test_rotation_deletes_exactly_the_deficit_in_rank_order(
    engine: EngineContext, simulator: Simulator
) -> None:
    """A full region and 5 jobs waiting: exactly 5 go, CREATEFAILED, retention's, then rank 3."""
    ids = await _quota_region(engine, simulator)
    policy = await engine.pool.fetchval("SELECT id FROM policies")
    fill_quota(simulator)
    await add_waiting(engine.pool, policy, 5)
    first = await rotation.rotate_for_quota(engine, ACCOUNT, REGION, policy_id=policy)
    # b[0] is 2.5 days old, a[2] 2 days: rank 3 goes round the instances, oldest first.
    assert first.deleted == (ids["failed"][0], ids["a"][0], ids["a"][1], ids["b"][0], ids["a"][2])
    assert first.room == 5
    assert not first.exhausted
    reasons = [r["reason"] for r in await events(engine.pool, "rotation.delete_requested")]
    assert (
        reasons == [rotation.RANK_FAILED] + [rotation.RANK_RELEASED] * 2 + [rotation.RANK_OWN] * 2
    )
    again = await rotation.rotate_for_quota(engine, ACCOUNT, REGION, policy_id=policy)
    assert again.deleted == ()
    assert again.room == 5


async def test_rotation_reports_exhaustion_when_nothing_can_go(
    engine: EngineContext, simulator: Simulator
) -> None:
    """Only each instance's newest NORMAL left and more jobs waiting: exhausted, logged once."""
    ids = await _quota_region(engine, simulator)
    policy = await engine.pool.fetchval("SELECT id FROM policies")
    fill_quota(simulator)
    await add_waiting(engine.pool, policy, 9)
    first = await rotation.rotate_for_quota(engine, ACCOUNT, REGION, policy_id=policy)
    assert len(first.deleted) == 5
    fill_quota(simulator)
    with capture_logs() as logs:
        last = await rotation.rotate_for_quota(engine, ACCOUNT, REGION, policy_id=policy)
    assert (last.room, last.wait, last.exhausted) == (0, False, True)
    assert {"event": "quota.exhausted", "account": ACCOUNT, "region": REGION} in [
        {k: e.get(k) for k in ("event", "account", "region")} for e in logs
    ]
    [exhausted] = await events(engine.pool, "quota.exhausted")
    assert exhausted["region"] == REGION
    survivors = [ids["a"][3], ids["b"][1], ids["c"][0]]
    assert all(alive(simulator, i) for i in survivors)
    assert foreign_alive(simulator)
    assert len(deleted_ids(simulator)) == len(set(deleted_ids(simulator))) == 5


async def test_deleting_images_count_as_room_coming(
    engine: EngineContext, simulator: Simulator, sim_clock: SimClock
) -> None:
    """Under a delete delay, sent deletions are room on its way: no second round of evictions,
    and the row is deleted only once the image is gone."""
    simulator.state.config = replace(simulator.state.config, delete_delay=30.0)
    policy = await add_policy(engine.pool, keep_last=5)
    history_ids = {i: await history(engine, policy, i, 4) for i in (A, B)}
    fill_quota(simulator)
    await add_waiting(engine.pool, policy, 2)
    first = await rotation.rotate_for_quota(engine, ACCOUNT, REGION, policy_id=policy)
    assert first.deleted == (history_ids[A][0], history_ids[B][0])
    assert first.wait
    assert first.room == 0
    assert [simulator.state.images[i].state for i in first.deleted] == ["DELETING"] * 2
    again = await rotation.rotate_for_quota(engine, ACCOUNT, REGION, policy_id=policy)
    assert again.deleted == ()
    assert again.wait
    live = await engine.pool.fetchval("SELECT count(*) FROM images WHERE deleted_at IS NULL")
    assert live == 8
    sim_clock.advance(31)
    assert await rotation.confirm_everywhere(engine, [ACCOUNT]) == 2
    confirmed = await rotation.rotate_for_quota(engine, ACCOUNT, REGION, policy_id=policy)
    assert (confirmed.deleted, confirmed.room) == ((), 2)
    assert len(simulator.state.deletions) == 2


async def test_rotation_waits_while_images_are_being_built(
    engine: EngineContext, simulator: Simulator
) -> None:
    """Nothing evictable but an image of ours is CREATING: wait, delete nothing."""
    policy = await add_policy(engine.pool, keep_last=1)
    await history(engine, policy, A, 1)
    simulator.state.create_delay = (60.0, 60.0)
    await record_image(engine.pool, await make_image(engine, A), policy, A, NOW, state="CREATING")
    fill_quota(simulator)
    [job] = await add_waiting(engine.pool, policy, 1)
    with capture_logs() as logs:
        result = await rotation.rotate_for_quota(engine, ACCOUNT, REGION, job_id=job)
    assert (result.room, result.wait, result.exhausted) == (0, True, False)
    assert "quota.exhausted" not in [e["event"] for e in logs]
    assert simulator.state.deletions == []


async def test_concurrent_rotations_free_distinct_images(
    engine: EngineContext, simulator: Simulator, pg_dsn: str
) -> None:
    """Rotations racing in one region, from two pools (two replicas), free the deficit once."""
    policy = await add_policy(engine.pool, keep_last=5)
    ids = await history(engine, policy, A, 5)
    fill_quota(simulator)
    await add_waiting(engine.pool, policy, 3)
    second = await pool.create_pool_dsn(pg_dsn, min_size=1, max_size=2)
    try:
        replica = replace(engine, pool=second, worker_id="other-host:2:def")
        contexts = (engine, replica, engine, replica)
        results = await asyncio.gather(
            *(rotation.rotate_for_quota(ctx, ACCOUNT, REGION, policy_id=policy) for ctx in contexts)
        )
    finally:
        await second.close()
    freed = [i for r in results for i in r.deleted]
    assert sorted(freed) == sorted(ids[:3])
    assert deleted_ids(simulator) == ids[:3]
    assert all(alive(simulator, i) for i in ids[3:])


async def test_region_lock_is_held_in_postgres(engine: EngineContext, pg_dsn: str) -> None:
    """While one process rotates a region, another session cannot take that region's lock."""
    key = (rotation.LOCK_NAMESPACE, f"{ACCOUNT}/{REGION}")
    try_lock = "SELECT pg_try_advisory_lock($1, hashtext($2))"
    other = await asyncpg.connect(pg_dsn)
    try:
        async with rotation.region_lock(engine, ACCOUNT, REGION):
            assert await other.fetchval(try_lock, *key) is False
            assert await other.fetchval(try_lock, key[0], f"{ACCOUNT}/ap-shanghai") is True
        assert await other.fetchval(try_lock, *key) is True
    finally:
        await other.close()


async def test_released_creating_job_counts_as_in_flight(
    engine: EngineContext, simulator: Simulator
) -> None:
    """A released job whose CreateImage may have worked means wait; a leased one does not."""
    policy = await add_policy(engine.pool, keep_last=1)
    await history(engine, policy, A, 1)
    fill_quota(simulator)
    job = await add_job(engine.pool, policy, B, "img-unknown1", NOW)
    await engine.pool.execute(
        "UPDATE jobs SET state = 'creating', image_id = NULL, lease_owner = 'me',"
        " lease_expires_at = now() + interval '1 minute' WHERE id = $1",
        job,
    )
    held = await rotation.rotate_for_quota(engine, ACCOUNT, REGION, job_id=job)
    assert (held.wait, held.exhausted) == (False, True)
    await engine.pool.execute(
        "UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL WHERE id = $1", job
    )
    released = await rotation.rotate_for_quota(engine, ACCOUNT, REGION, job_id=job)
    assert (released.wait, released.exhausted) == (True, False)
    assert simulator.state.deletions == []


async def test_quiet_sweep_records_keeps_and_hands_back_what_can_go(
    engine: EngineContext, simulator: Simulator
) -> None:
    """Pairs retention leaves alone get their keeps recorded; the others are handed back."""
    policy = await add_policy(engine.pool, keep_last=2)
    quiet = await history(engine, policy, A, 2)
    loud = await history(engine, policy, B, 3)
    assert await rotation.sweep_quiet(engine, [(policy, A), (policy, B), (policy, C)]) == [
        (policy, B)
    ]
    kept = {r["image_id"]: r["reason"] for r in await events(engine.pool, "retention.kept")}
    assert kept == {quiet[1]: "newest NORMAL; keep_last 1/2", quiet[0]: "keep_last 2/2"}
    assert all(alive(simulator, i) for i in quiet + loud)
    assert simulator.state.deletions == []
    # The full sweep then deletes exactly what retention lets go.
    assert await rotation.apply_retention(engine, policy, B) == [loud[0]]


async def test_quiet_sweep_hands_back_a_pair_with_a_pending_intent(
    engine: EngineContext, simulator: Simulator
) -> None:
    """An unconfirmed deletion needs the locked sweep to finish it, even with nothing new to go."""
    policy = await add_policy(engine.pool, keep_last=5)
    ids = await history(engine, policy, A, 2)
    await engine.pool.execute(
        "UPDATE images SET delete_requested_at = now(), delete_reason = 'x' WHERE image_id = $1",
        ids[0],
    )
    assert await rotation.sweep_quiet(engine, [(policy, A)]) == [(policy, A)]
    assert await events(engine.pool, "retention.kept") == []
