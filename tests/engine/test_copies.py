"""Cross-region copies: exactly one copy per backup and destination, each end kept by its rules."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from orchestrator import naming, plan, reconcile, scheduler, status
from orchestrator.context import EngineContext
from orchestrator.simulator.config import Faults, SimConfig, SimImageSeed
from orchestrator.simulator.records import SimImage
from orchestrator.simulator.runner import Simulator
from tests.fixtures.engine import drain, insert_policy
from tests.fixtures.sim import TEST_QUOTA, TEST_REGION, assert_sim_clean, make_sim_config

DESTINATION = "ap-shanghai"


@pytest.fixture
def sim_config(request: pytest.FixtureRequest) -> SimConfig:
    """Three instances; copies sync for a moment, listings lag and deletions linger.

    Parametrized "full": the destination holds two slots of copies plus an image not ours.
    """
    full = getattr(request, "param", None) == "full"
    foreign = SimImageSeed(image_id="img-foreign2", name="golden-dr", region=DESTINATION)
    base = make_sim_config(instances=3)
    return replace(
        base,
        images=(*base.images, foreign) if full else base.images,
        quota={TEST_REGION: TEST_QUOTA, DESTINATION: 7 if full else TEST_QUOTA},
        sync_delay=(0.2, 0.5),
        list_lag=0.3,
        delete_delay=0.3,
    )


async def _policy(pool: asyncpg.Pool, sim: Simulator, keep_last: int = 1) -> int:
    ids = [spec.instance_id for spec in sim.config.instances]
    policy_id = await insert_policy(pool, "dr", instance_ids=ids, keep_last=keep_last)
    copies = [{"region": DESTINATION, "keep_last": keep_last}]
    await pool.execute("UPDATE policies SET copies = $2 WHERE id = $1", policy_id, copies)
    return policy_id


async def _slots(ctx: EngineContext, *days: int) -> list[datetime]:
    """Back up one daily slot per entry of `days` (days ago), draining each run: its copies too."""
    slots = []
    now = datetime.now(UTC)
    for ago in days:
        for run in await scheduler.schedule_pass(ctx, now=now - timedelta(days=ago)):
            assert await drain(ctx, run_id=run.run_id) == 0
            slots.append(run.slot)
    return slots


def _alive(images: Sequence[SimImage]) -> list[SimImage]:
    return [i for i in images if i.alive and i.state != "DELETING"]


def _copies_of(sim: Simulator, slot: datetime) -> dict[str, list[SimImage]]:
    """instance id -> the live copies of that slot's backup in the destination."""
    found = {}
    for spec in sim.config.instances:
        name = naming.image_name("dr", spec.instance_id, slot)
        found[spec.instance_id] = [
            i for i in _alive(sim.state.images_named(name)) if i.region == DESTINATION
        ]
    return found


async def test_two_slots_keep_one_copy_at_each_end(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """keep_last 1 at both ends: one NORMAL copy per slot, the older copy and backup go after
    the newer are NORMAL, and no source is ever sent to DeleteImages while it syncs."""
    await _policy(pg_pool, simulator)
    (first,) = await _slots(engine_ctx, 1)
    for instance, copies in _copies_of(simulator, first).items():
        assert [c.state for c in copies] == ["NORMAL"], instance
    (second,) = await _slots(engine_ctx, 0)
    for instance, copies in _copies_of(simulator, second).items():
        assert [c.state for c in copies] == ["NORMAL"], instance
    # The first slot's copies and backups went once the second's were NORMAL.
    assert all(not c for c in _copies_of(simulator, first).values())
    for spec in simulator.config.instances:
        name = naming.image_name("dr", spec.instance_id, first)
        assert _alive(simulator.state.images_named(name)) == []
    assert simulator.state.count_calls("DeleteImages", "InvalidImageId.IncorrectState") == 0
    rows = await pg_pool.fetch(
        "SELECT kind, state, count(*) AS n FROM jobs GROUP BY kind, state ORDER BY kind"
    )
    assert [(r["kind"], r["state"], r["n"]) for r in rows] == [
        ("backup", "succeeded", 6),
        ("copy", "succeeded", 6),
    ]
    # status: each instance's latest good copy in the destination, beside its own backup.
    for row in await status.fetch_rows(pg_pool):
        (copy,) = row["copies"]
        assert copy["region"] == DESTINATION
        assert copy["slot"] == second.isoformat().replace("+00:00", "+00:00")
        assert copy["image_id"] != row["latest_image"]
        assert copy["age_seconds"] >= 0
        assert row["state"] == "succeeded"
    assert_sim_clean(simulator)


async def test_a_lost_sync_answer_makes_no_second_copy(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """SyncImages answers lost after the copy was made: the look-up by name adopts it."""
    await _policy(pg_pool, simulator, keep_last=3)
    simulator.set_faults(Faults(drop_rate=0.6), action="SyncImages")
    (slot,) = await _slots(engine_ctx, 0)
    simulator.clear_faults()
    for instance, copies in _copies_of(simulator, slot).items():
        assert [c.state for c in copies] == ["NORMAL"], instance
    # Some answers were lost, and no copy was made twice for it.
    assert simulator.state.count_calls("SyncImages") > 3
    recorded = await pg_pool.fetch(
        "SELECT image_id, source_image_id FROM images WHERE region = $1", DESTINATION
    )
    assert len(recorded) == 3
    assert all(r["source_image_id"] for r in recorded)
    assert_sim_clean(simulator)


async def test_a_removed_destination_keeps_its_copies(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """Copies whose destination left the policy are kept: no rules, nothing wiped."""
    policy_id = await _policy(pg_pool, simulator)
    (first,) = await _slots(engine_ctx, 1)
    await pg_pool.execute(
        "UPDATE policies SET copies = $2 WHERE id = $1",
        policy_id,
        json.loads('[{"region": "ap-beijing", "keep_last": 1}]'),
    )
    await _slots(engine_ctx, 0)
    for instance, copies in _copies_of(simulator, first).items():
        assert [c.state for c in copies] == ["NORMAL"], instance


@pytest.mark.parametrize("sim_config", ["full"], indirect=True)
async def test_a_full_destination_rotates_copies_there_only(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """Quota full in the destination: the oldest copies there go by the rotation rules; the
    source region and the image that is not ours are untouched."""
    await _policy(pg_pool, simulator, keep_last=3)
    first, second, third = await _slots(engine_ctx, 2, 1, 0)
    for slot in (second, third):
        for instance, copies in _copies_of(simulator, slot).items():
            assert [c.state for c in copies] == ["NORMAL"], instance
    # Rank 3: the requesting policy's oldest copy of each instance with a newer NORMAL one.
    assert all(not c for c in _copies_of(simulator, first).values())
    assert simulator.state.images["img-foreign2"].alive
    for spec in simulator.config.instances:
        name = naming.image_name("dr", spec.instance_id, first)
        homes = [i for i in _alive(simulator.state.images_named(name)) if i.region == TEST_REGION]
        assert len(homes) == 1, name  # keep_last 3 at home: the source stays
    reasons = await pg_pool.fetch(
        "SELECT DISTINCT region, delete_reason FROM images WHERE delete_reason IS NOT NULL"
    )
    assert {(r["region"], r["delete_reason"].split(":")[0]) for r in reasons} == {
        (DESTINATION, "quota_eviction rank 3")
    }
    assert_sim_clean(simulator)


async def test_plan_names_the_copies_a_run_would_make(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """`plan` lists each destination with how many copies a run makes and their rules."""
    await _policy(pg_pool, simulator)
    made = await plan.make_plan(engine_ctx, "dr")
    assert made.to_json()["copies"] == [
        {
            "region": DESTINATION,
            "instances": 3,
            "retention": {
                "keep_last": 1,
                "keep_daily": 0,
                "keep_weekly": 0,
                "keep_monthly": 0,
                "keep_yearly": 0,
            },
        }
    ]
    assert f"  3 to {DESTINATION}, kept there by keep_last 1" in plan.render(made)


async def test_reconcile_adopts_copies_after_a_lost_database(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """With the tables wiped, reconcile adopts the backups by their tags, then each copy by its
    backup's exact name, naming its source; the image that is not ours stays unknown."""
    await _policy(pg_pool, simulator, keep_last=3)
    await _slots(engine_ctx, 0)
    made = {
        r["image_id"]: r["source_image_id"]
        for r in await pg_pool.fetch("SELECT image_id, source_image_id FROM images")
    }
    await pg_pool.execute("TRUNCATE images, jobs, runs")
    report = await reconcile.reconcile(engine_ctx, {"default"}, margin=0.0)
    adopted = {
        r["image_id"]: r["source_image_id"]
        for r in await pg_pool.fetch("SELECT image_id, source_image_id FROM images")
    }
    assert adopted == made
    assert sum(1 for source in adopted.values() if source) == 3
    assert report.count(reconcile.ADOPTED) == 6
