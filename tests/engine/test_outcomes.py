"""Outcomes that match the cloud: look-ups that answered before a terminal state, and the fence."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime

import asyncpg
import pytest

from orchestrator import scheduler
from orchestrator.config import DEFAULT_LIMITS
from orchestrator.context import EngineContext
from orchestrator.daemon import Engine, Signals, engine_context
from orchestrator.db import policies as policy_rows
from orchestrator.dispatcher import Dispatcher
from orchestrator.scheduler import Targets
from orchestrator.simulator.config import Faults
from orchestrator.simulator.runner import Simulator
from tests.fixtures.engine import FAST_RETRY, fast_settings, insert_policy, job_states
from tests.fixtures.logs import LogCapture
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import assert_sim_clean

LOST_ANSWER = Faults(drop_rate=1.0, after_create=1.0)  # the image is made, the answer lost
NO_ANSWER = Faults(internal_error_rate=1.0)


async def _run(pool: asyncpg.Pool, name: str, ids: tuple[str, ...]) -> int:
    policy = await policy_rows.fetch_policy(pool, name)
    assert policy is not None
    slot = datetime.now(UTC).replace(second=0, microsecond=0)
    return (await scheduler.create_run(pool, policy, slot, Targets(ids, ()), "manual")).run_id


async def _outcomes(pool: asyncpg.Pool, outcome: str) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM events WHERE kind = 'job.attempt' AND details->>'outcome' = $1",
            outcome,
        )
    )


async def _start(ctx: EngineContext, run_id: int) -> tuple[Signals, asyncio.Task[int]]:
    signals = Signals()
    return signals, asyncio.create_task(Engine(ctx, signals, run_id=run_id).run())


async def _stop(signals: Signals, running: asyncio.Task[int]) -> None:
    signals.stop.set()
    await asyncio.wait_for(running, 20)


async def _lost_answer_run(ctx: EngineContext, pool: asyncpg.Pool, sim: Simulator) -> int:
    """One job whose CreateImage worked but whose answer was lost, and DescribeImages failing."""
    instance = sim.config.instances[0].instance_id
    await insert_policy(pool, "lost", instance_ids=[instance])
    sim.set_faults(LOST_ANSWER, action="CreateImage")
    sim.set_faults(NO_ANSWER, action="DescribeImages")
    return await _run(pool, "lost", (instance,))


async def test_a_job_whose_lookups_fail_stays_creating_until_one_answers(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """Out of transient budget with no look-up answered: not terminal; adopted once one answers."""
    run_id = await _lost_answer_run(engine_ctx, pg_pool, simulator)
    retry = replace(FAST_RETRY, max_transient_attempts=2)
    ctx = replace(engine_ctx, settings=replace(engine_ctx.settings, retry=retry))
    signals, running = await _start(ctx, run_id)
    try:

        async def kept_looking() -> bool:
            return await _outcomes(pg_pool, "lookup_unanswered") >= 3

        await wait_for(kept_looking)
        assert [s for s, _, _ in (await job_states(pg_pool)).values()] == ["creating"]
        simulator.clear_faults()

        async def succeeded() -> bool:
            return [s for s, _, _ in (await job_states(pg_pool)).values()] == ["succeeded"]

        await wait_for(succeeded)
    finally:
        await _stop(signals, running)
    assert simulator.state.count_calls("CreateImage") == 1
    assert await _outcomes(pg_pool, "resolved_by_name") == 1
    assert_sim_clean(simulator)


async def test_past_its_window_a_job_that_may_have_made_an_image_backs_off_for_real(
    engine_ctx: EngineContext,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    captured_logs: LogCapture,
) -> None:
    """Past the deadline, unanswered look-ups wait at least the backoff base; the image is kept."""
    run_id = await _lost_answer_run(engine_ctx, pg_pool, simulator)
    signals, running = await _start(engine_ctx, run_id)

    async def creating() -> bool:
        return [s for s, _, _ in (await job_states(pg_pool)).values()] == ["creating"]

    try:
        await wait_for(creating)
    finally:
        await _stop(signals, running)
    # A new engine claims it past its window: every decision it makes sees the closed window.
    await pg_pool.execute("UPDATE jobs SET deadline = now() - interval '1 minute'")
    seen = len(captured_logs.lines)
    signals, running = await _start(engine_ctx, run_id)
    try:

        async def looked_three_times() -> bool:
            return len(_retries(captured_logs, since=seen)) >= 3

        await wait_for(looked_three_times)
        simulator.clear_faults()

        async def adopted() -> bool:
            return await _outcomes(pg_pool, "resolved_by_name") == 1

        await wait_for(adopted)
    finally:
        await _stop(signals, running)
    base = FAST_RETRY.transient_base
    # Logged after the write, so a little under the delay chosen; never the old negative one.
    assert all(delay >= base / 2 for delay in _retries(captured_logs, since=seen))
    row = await pg_pool.fetchrow(
        "SELECT j.state, i.image_id FROM jobs j JOIN images i ON i.job_id = j.id"
    )
    assert row is not None
    assert row["state"] in ("succeeded", "expired", "waiting_image")
    assert simulator.state.count_calls("CreateImage") == 1


def _retries(logs: LogCapture, *, since: int) -> list[float]:
    """The delays of the retries scheduled after log line `since`, in seconds."""
    return [
        float(line["delay"])
        for line in logs.lines[since:]
        if line["event"] == "job.retry_scheduled" and line["state"] == "creating"
    ]


@pytest.fixture
async def slow_create_ctx(
    pg_pool: asyncpg.Pool, sim_env: Simulator
) -> AsyncIterator[EngineContext]:
    """Short leases (a 1.5 s fence), and CreateImage one call a second: later calls queue."""
    settings = fast_settings(
        "unused",
        sim_env.url,
        lease_seconds=2.0,
        request_timeout=0.5,
        max_in_flight=12,
        limits={**DEFAULT_LIMITS, "CreateImage": 1},
    )
    async with engine_context(settings, pg_pool) as ctx:
        yield ctx


async def test_a_call_queued_past_its_lease_is_never_sent_and_the_job_not_reclaimed_by_its_owner(
    slow_create_ctx: EngineContext,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    captured_logs: LogCapture,
) -> None:
    """No heartbeat: calls still queued when the fence closes are not sent; the owner never
    claims its own in-flight jobs again; another worker finishes them with one image each."""
    ids = tuple(i.instance_id for i in simulator.config.instances[:6])
    await insert_policy(pg_pool, "fenced", instance_ids=ids)
    run_id = await _run(pg_pool, "fenced", ids)
    stop = asyncio.Event()
    owner = Dispatcher(slow_create_ctx, run_id=run_id)
    assert await owner.dispatch_once(stop) == len(ids)

    async def leases_ran_out() -> bool:
        return bool(
            await pg_pool.fetchval(
                "SELECT bool_and(lease_expires_at < now()) FROM jobs WHERE lease_owner IS NOT NULL"
            )
        )

    await wait_for(leases_ran_out)
    if owner.in_flight:  # its stalled tasks' jobs are due for others, never for itself
        assert await owner.dispatch_once(stop) == 0

    async def owner_done() -> bool:
        return not owner.in_flight

    await wait_for(owner_done)
    fenced = [line for line in captured_logs.lines if line["event"] == "job.fenced"]
    assert fenced, "a call queued past the fence was sent"
    assert simulator.state.count_calls("CreateImage") == len(ids) - len(fenced)
    other = replace(slow_create_ctx, worker_id="other-worker")
    engine = Engine(other, Signals(), once=True, run_id=run_id)
    assert await asyncio.wait_for(engine.run(), 60) == 0
    assert {s for s, _, _ in (await job_states(pg_pool)).values()} == {"succeeded"}
    assert simulator.state.count_calls("CreateImage") == len(ids)
    assert_sim_clean(simulator)
