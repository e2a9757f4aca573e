"""Dispatcher outcomes one by one: crash resolution, lost answers, accounts, windows, options."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from orchestrator import naming, scheduler
from orchestrator.context import EngineContext
from orchestrator.daemon import EXIT_JOBS_FAILED, Engine, Signals
from orchestrator.db import policies as policy_rows
from orchestrator.scheduler import Targets
from orchestrator.simulator.config import Faults
from orchestrator.simulator.runner import Simulator
from orchestrator.tencent.client import CvmClient
from orchestrator.tencent.credentials import Credentials, StaticCredentials
from tests.fixtures.engine import drain, insert_policy, job_states
from tests.fixtures.logs import LogCapture
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import TEST_REGION, TEST_SECRET_ID, assert_sim_clean


async def _run(
    pool: asyncpg.Pool, name: str, ids: tuple[str, ...], slot: datetime | None = None
) -> int:
    """A run created straight in the database (no API call), for the given instances."""
    policy = await policy_rows.fetch_policy(pool, name)
    assert policy is not None
    slot = slot or datetime.now(UTC).replace(second=0, microsecond=0)
    return (await scheduler.create_run(pool, policy, slot, Targets(ids, ()), "manual")).run_id


def _create_calls(sim: Simulator) -> int:
    return sim.state.count_calls("CreateImage")


async def test_job_found_mid_call_adopts_the_image_instead_of_creating(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """After a crash in 'creating', the name lookup finds the image: no second CreateImage."""
    instance = simulator.config.instances[0].instance_id
    await insert_policy(pg_pool, "mid", instance_ids=[instance])
    run_id = await _run(pg_pool, "mid", (instance,))
    name = await pg_pool.fetchval("SELECT image_name FROM jobs")
    # The dead process got as far as the call: Tencent made the image, the answer was lost.
    client = engine_ctx.client("default")
    await client.create_image(
        TEST_REGION, instance_id=instance, name=name, tags=naming.ours_tags("default", "mid")
    )
    await pg_pool.execute("UPDATE jobs SET state = 'creating'")
    assert await drain(engine_ctx, run_id=run_id) == 0
    assert _create_calls(simulator) == 1
    assert (await job_states(pg_pool))[instance][0] == "succeeded"
    events = await pg_pool.fetch("SELECT details FROM events WHERE kind = 'job.attempt'")
    assert [e["details"]["outcome"] for e in events] == ["resolved_by_name"]
    assert_sim_clean(simulator)


async def test_error_answer_for_a_call_that_worked_is_resolved_by_name(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """InternalError or a dropped connection after the image was made: adopt it, never twice."""
    ids = tuple(i.instance_id for i in simulator.config.instances[:4])
    simulator.set_faults(
        Faults(internal_error_rate=0.5, drop_rate=0.5, after_create=1.0), action="CreateImage"
    )
    await insert_policy(pg_pool, "lost", instance_ids=ids)
    assert await drain(engine_ctx, run_id=await _run(pg_pool, "lost", ids)) == 0
    assert _create_calls(simulator) == len(ids)  # every first call worked; none was repeated
    assert {s for s, _, _ in (await job_states(pg_pool)).values()} == {"succeeded"}
    assert_sim_clean(simulator)


async def test_account_error_fails_the_job_and_pauses_the_account(
    engine_ctx: EngineContext,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    captured_logs: LogCapture,
) -> None:
    """AuthFailure fails the job, logs account.paused loudly, and stops calls for that account."""
    ids = tuple(i.instance_id for i in simulator.config.instances)
    await insert_policy(pg_pool, "auth", instance_ids=ids)
    run_id = await _run(pg_pool, "auth", ids)
    wrong = StaticCredentials(Credentials(secret_id=TEST_SECRET_ID, secret_key="wrong-key-x"))
    settings = replace(engine_ctx.settings, max_in_flight=1)
    async with CvmClient(credentials=wrong, endpoint=simulator.url, account="default") as bad:
        ctx = replace(engine_ctx, clients={"default": bad}, settings=settings)
        assert await drain(ctx, run_id=run_id) == 1
    states = await job_states(pg_pool)
    failed = [i for i, (s, _, _) in states.items() if s == "failed"]
    assert len(failed) == 1
    assert states[failed[0]][2] == "AuthFailure.SignatureFailure"
    assert sum(1 for s, _, _ in states.values() if s == "pending") == len(ids) - 1
    assert simulator.state.count_calls("CreateImage") == 1
    paused = [line for line in captured_logs.lines if line["event"] == "account.paused"]
    assert len(paused) == 1
    assert paused[0]["level"] == "error"
    assert "wrong-key-x" not in captured_logs.text
    pause = await pg_pool.fetchrow("SELECT * FROM account_pauses")
    assert pause is not None
    assert pause["code"] == "AuthFailure.SignatureFailure"
    assert "wrong-key-x" not in str(dict(pause))


async def test_job_whose_window_closed_is_expired_without_a_call(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """A job claimed after its completion window closed ends 'expired' and the run exits 1."""
    instance = simulator.config.instances[0].instance_id
    await insert_policy(pg_pool, "old", instance_ids=[instance], window="1 minute")
    slot = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)
    assert await drain(engine_ctx, run_id=await _run(pg_pool, "old", (instance,), slot)) == 1
    assert (await job_states(pg_pool))[instance][:2] == ("expired", "window_closed")
    assert _create_calls(simulator) == 0


async def test_job_of_a_disabled_policy_is_skipped(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """Jobs left over when a policy is disabled are skipped with that reason."""
    instance = simulator.config.instances[0].instance_id
    await insert_policy(pg_pool, "off", instance_ids=[instance])
    run_id = await _run(pg_pool, "off", (instance,))
    await pg_pool.execute("UPDATE policies SET enabled = false")
    assert await drain(engine_ctx, run_id=run_id) == 0
    assert (await job_states(pg_pool))[instance][:2] == ("skipped", "policy_disabled")


@pytest.mark.parametrize("whole_machine", [True, False])
async def test_policy_options_reach_create_image(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator, whole_machine: bool
) -> None:
    """include_data_disks sends the instance's DataDiskIds; the image carries our tags."""
    spec = simulator.config.instances[0]
    await insert_policy(
        pg_pool, "opts", instance_ids=[spec.instance_id], include_data_disks=whole_machine
    )
    assert await drain(engine_ctx, run_id=await _run(pg_pool, "opts", (spec.instance_id,))) == 0
    (image,) = [i for i in simulator.state.iter_ours()]
    assert image.data_disk_ids == (spec.data_disk_ids if whole_machine else ())
    assert image.tags[naming.TAG_POLICY] == "opts"
    assert image.tags[naming.TAG_DEPLOYMENT] == "default"


async def test_a_dying_background_task_stops_the_daemon_with_an_error(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, captured_logs: LogCapture
) -> None:
    """A loop that dies (its table vanished) stops the daemon, non-zero, instead of hanging."""
    engine = Engine(engine_ctx, Signals())
    running = asyncio.create_task(engine.run())

    async def started() -> bool:
        return "daemon.started" in captured_logs.events()

    await wait_for(started, within=10)
    await pg_pool.execute("ALTER TABLE runs RENAME TO runs_elsewhere")
    assert await asyncio.wait_for(running, 20) == 1
    failed = [line for line in captured_logs.lines if line["event"] == "daemon.task_failed"]
    assert failed
    assert failed[0]["level"] == "error"
    assert "runs" in failed[0]["error"]


async def test_a_retry_wakes_the_idle_dispatcher(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """A retry due before the idle loop's next look wakes it: no wait for a poll or a lease."""
    # Without the wake-up each retry would wait out the 60 s lease (or the 600 s poll).
    settings = replace(engine_ctx.settings, poll_interval=600.0, lease_seconds=60.0)
    ctx = replace(engine_ctx, settings=settings)
    instance = simulator.config.instances[0].instance_id
    simulator.set_faults(Faults(internal_error_rate=1.0), action="CreateImage")
    await insert_policy(pg_pool, "woken", instance_ids=[instance])
    run_id = await _run(pg_pool, "woken", (instance,))
    assert await drain(ctx, run_id=run_id, within=20) == EXIT_JOBS_FAILED
    attempts = settings.retry.max_transient_attempts
    assert (await job_states(pg_pool))[instance] == ("failed", "retries_exhausted", "InternalError")
    assert _create_calls(simulator) == attempts
