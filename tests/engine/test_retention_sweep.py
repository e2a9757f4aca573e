"""The retention sweep: retention over every pair with live images, on its own schedule."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from orchestrator import scheduler, sweep
from orchestrator.context import EngineContext
from orchestrator.daemon import Engine, Signals
from orchestrator.simulator.config import SimConfig
from orchestrator.simulator.runner import Simulator
from tests.fixtures.engine import drain, insert_policy
from tests.fixtures.logs import LogCapture
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import assert_sim_clean, make_sim_config

# Deleted images stay listed as DELETING this long: a deletion is done only once they are gone.
DELETE_DELAY = 0.5


@pytest.fixture
def sim_config() -> SimConfig:
    """Three instances; deletions linger as DELETING for half a second."""
    return replace(make_sim_config(instances=3), delete_delay=DELETE_DELAY)


def _ids(sim: Simulator) -> tuple[str, ...]:
    return tuple(i.instance_id for i in sim.config.instances)


async def _three_slots(ctx: EngineContext) -> None:
    """Back up the last three daily slots (today's included, so nothing more is due)."""
    now = datetime.now(UTC)
    for days in (2, 1, 0):
        for run in await scheduler.schedule_pass(ctx, now=now - timedelta(days=days)):
            assert await drain(ctx, run_id=run.run_id) == 0


async def _live(pool: asyncpg.Pool, policy_id: int) -> dict[str, list[str]]:
    """instance id -> its live image ids, oldest first."""
    rows = await pool.fetch(
        "SELECT instance_id, image_id FROM images WHERE policy_id = $1 AND deleted_at IS NULL"
        " ORDER BY created_at",
        policy_id,
    )
    live: dict[str, list[str]] = {}
    for row in rows:
        live.setdefault(row["instance_id"], []).append(row["image_id"])
    return live


async def _newest(pool: asyncpg.Pool, policy_id: int) -> dict[str, str]:
    rows = await pool.fetch(
        "SELECT DISTINCT ON (instance_id) instance_id, image_id FROM images"
        " WHERE policy_id = $1 ORDER BY instance_id, created_at DESC",
        policy_id,
    )
    return {r["instance_id"]: r["image_id"] for r in rows}


@pytest.fixture
async def daemon(engine_ctx: EngineContext) -> AsyncIterator[Engine]:
    """A running engine (not --once) sweeping every half second; stopped cleanly after."""
    settings = replace(engine_ctx.settings, retention_interval=0.5)
    engine = Engine(replace(engine_ctx, settings=settings), Signals())
    yield engine
    engine.signals.stop.set()


async def test_lowering_keep_last_deletes_the_surplus_without_a_new_backup(
    engine_ctx: EngineContext,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    daemon: Engine,
) -> None:
    """keep_last 3 -> 1 on a running daemon: two images per instance go, no backup is made."""
    policy = await insert_policy(pg_pool, "lower", instance_ids=_ids(simulator), keep_last=3)
    await _three_slots(engine_ctx)
    newest = await _newest(pg_pool, policy)
    jobs_before = await pg_pool.fetchval("SELECT count(*) FROM jobs")
    running = asyncio.create_task(daemon.run())
    await pg_pool.execute("UPDATE policies SET keep_last = 1 WHERE id = $1", policy)

    async def thinned() -> bool:
        live = await _live(pg_pool, policy)
        return all(len(ids) == 1 for ids in live.values())

    await wait_for(thinned, within=15)
    daemon.signals.stop.set()
    assert await asyncio.wait_for(running, 20) == 0
    assert await _live(pg_pool, policy) == {i: [newest[i]] for i in _ids(simulator)}
    assert await pg_pool.fetchval("SELECT count(*) FROM jobs") == jobs_before
    ours = [i for i in simulator.state.images.values() if i.alive and i.ours]
    assert sorted(i.image_id for i in ours) == sorted(newest.values())
    assert_sim_clean(simulator)


async def _confirm_all(ctx: EngineContext, pool: asyncpg.Pool, n: int) -> None:
    async def done() -> bool:
        await sweep.sweep(ctx, ctx.clients.keys())
        gone = await pool.fetchval("SELECT count(*) FROM images WHERE deleted_at IS NOT NULL")
        return bool(gone == n)

    await wait_for(done, within=10)


async def test_an_instance_that_left_the_policy_keeps_only_its_newest_image(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """Out of the selection and past max age: the sweep keeps its newest image, deletes the rest."""
    gone, *staying = _ids(simulator)
    policy = await insert_policy(pg_pool, "left", instance_ids=_ids(simulator), keep_last=3)
    await _three_slots(engine_ctx)
    await pg_pool.execute(
        "UPDATE policies SET instance_ids = $2, max_age_days = 30, enabled = false WHERE id = $1",
        policy,
        staying,
    )
    # Its images are from long ago now: max age wants every one of them gone.
    await pg_pool.execute(
        "UPDATE images SET created_at = created_at - interval '90 days' WHERE instance_id = $1",
        gone,
    )
    newest = await _newest(pg_pool, policy)
    result = await sweep.sweep(engine_ctx, engine_ctx.clients.keys())
    assert len(result.deleted) == 2
    assert not result.skipped
    await _confirm_all(engine_ctx, pg_pool, 2)  # a later sweep sees them gone
    live = await _live(pg_pool, policy)
    assert live[gone] == [newest[gone]]
    assert all(len(live[i]) == 3 for i in staying)


async def test_a_bad_timezone_row_is_skipped_and_the_daemon_stays_up(
    engine_ctx: EngineContext,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    daemon: Engine,
    captured_logs: LogCapture,
) -> None:
    """A zone zoneinfo does not know: retention.skipped, its images stay, the others are swept."""
    first, second, third = _ids(simulator)
    bad = await insert_policy(pg_pool, "bad", instance_ids=(first,), keep_last=3)
    good = await insert_policy(pg_pool, "good", instance_ids=(second, third), keep_last=3)
    await _three_slots(engine_ctx)
    running = asyncio.create_task(daemon.run())
    # The CHECK sees only the form of the name; zoneinfo knows no such zone.
    await pg_pool.execute(
        "UPDATE policies SET keep_last = 1, timezone = CASE WHEN id = $1"
        " THEN 'Mars/Olympus_Mons' ELSE timezone END",
        bad,
    )

    async def thinned() -> bool:
        return all(len(ids) == 1 for ids in (await _live(pg_pool, good)).values())

    await wait_for(thinned, within=15)
    await asyncio.sleep(0)  # let the pass that deleted them finish logging
    assert not running.done()
    daemon.signals.stop.set()
    assert await asyncio.wait_for(running, 20) == 0
    assert len((await _live(pg_pool, bad))[first]) == 3
    skipped = [line for line in captured_logs.lines if line["event"] == "retention.skipped"]
    assert skipped
    assert all(line["policy_id"] == bad for line in skipped)
    assert "Mars/Olympus_Mons" in skipped[0]["reason"]
    assert "daemon.task_failed" not in captured_logs.events()
