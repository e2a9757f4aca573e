"""The tracker against an unkind API: DescribeImages failing, or refusing the account."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from orchestrator import pauses, tracker
from orchestrator.config import DEFAULT_LIMITS
from orchestrator.context import EngineContext
from orchestrator.simulator.config import Faults, SimConfig, SimInstance
from orchestrator.simulator.runner import Simulator
from orchestrator.tencent.client import CvmClient, RetryPolicy
from orchestrator.tencent.credentials import Credentials, StaticCredentials
from tests.engine_parts.helpers import (
    ACCOUNT,
    INSTANCES,
    REGION,
    add_job,
    add_policy,
    events,
    make_image,
    record_image,
)
from tests.fixtures.engine import fast_settings
from tests.fixtures.logs import LogCapture
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import TEST_SECRET_ID, TEST_SECRET_KEY, make_sim_config

A, B, _ = INSTANCES
CAM_DENIAL = "UnauthorizedOperation.PermissionDenied"
BALANCE = "InvalidAccount.InsufficientBalance"
# Room in the call budget for polls 10 ms apart, far more often than the min interval.
DESCRIBE_BUDGET = {**DEFAULT_LIMITS, "DescribeImages": 400}


@pytest.fixture
def sim_config() -> SimConfig:
    """Our test instances, images NORMAL at once, no rate limits (these tests count calls)."""
    base = make_sim_config(0)
    return replace(
        base,
        instances=tuple(SimInstance(i) for i in INSTANCES),
        create_delay=(0.0, 0.0),
        limits=dict.fromkeys(base.limits),
    )


@pytest.fixture
async def engine(pg_pool: asyncpg.Pool, simulator: Simulator) -> AsyncIterator[EngineContext]:
    """A context whose client sends each call once: one failed poll is one DescribeImages."""
    settings = fast_settings(
        "unused",
        simulator.url,
        tracker_min_interval=0.25,
        tracker_max_interval=1.0,
        limits=DESCRIBE_BUDGET,
    )
    creds = StaticCredentials(Credentials(TEST_SECRET_ID, TEST_SECRET_KEY))
    once = RetryPolicy(transient_attempts=1)
    async with CvmClient(
        credentials=creds, endpoint=simulator.url, account=ACCOUNT, retry=once
    ) as client:
        yield EngineContext(pg_pool, {ACCOUNT: client}, settings, "test-host:1:abc")


async def _job_state(pool: asyncpg.Pool, job_id: int) -> tuple[str, str | None]:
    row = await pool.fetchrow("SELECT state, reason FROM jobs WHERE id = $1", job_id)
    assert row is not None
    return (row["state"], row["reason"])


async def _image_state(pool: asyncpg.Pool, image_id: str) -> str | None:
    value = await pool.fetchval("SELECT state FROM images WHERE image_id = $1", image_id)
    return None if value is None else str(value)


async def test_window_closes_while_describe_images_fails(
    engine: EngineContext, simulator: Simulator
) -> None:
    """A waiting_image job past its window expires while DescribeImages fails; the image row stays tracked and is picked up when DescribeImages answers again."""  # noqa: E501
    policy = await add_policy(engine.pool)
    image = await make_image(engine, A)
    # Made seven hours ago: its six-hour window has closed, and no images row was recorded.
    slot = datetime.now(UTC) - timedelta(hours=7)
    job = await add_job(engine.pool, policy, A, image, slot)
    simulator.set_faults(Faults(internal_error_rate=1.0), action="DescribeImages")
    assert await tracker.poll_once(engine) == 1
    assert await _job_state(engine.pool, job) == ("expired", "window_closed")
    assert await _image_state(engine.pool, image) == "CREATING"
    assert await tracker.poll_once(engine) == 1  # still failing: nothing is written twice
    assert [(e["job_id"], e["reason"]) for e in await events(engine.pool, "job.expired")] == [
        (job, "window_closed")
    ]
    simulator.clear_faults()
    assert await tracker.poll_once(engine) == 0
    assert await _image_state(engine.pool, image) == "NORMAL"
    assert await _job_state(engine.pool, job) == ("expired", "window_closed")


@pytest.mark.parametrize(("code", "scope_region"), [(CAM_DENIAL, REGION), (BALANCE, None)])
async def test_account_error_pauses_instead_of_polling_again(
    engine: EngineContext,
    simulator: Simulator,
    captured_logs: LogCapture,
    code: str,
    scope_region: str | None,
) -> None:
    """An account-class answer to DescribeImages pauses once; no DescribeImages follows."""
    policy = await add_policy(engine.pool)
    image = await make_image(engine, A)
    job = await add_job(engine.pool, policy, A, image, datetime.now(UTC))
    await record_image(engine.pool, image, policy, A, datetime.now(UTC), state="CREATING")
    simulator.set_account_error(code, ("DescribeImages",), region=REGION)
    assert await tracker.poll_once(engine) == 0
    calls = simulator.state.count_calls("DescribeImages")
    for _ in range(3):
        assert await tracker.poll_once(engine) == 0
    assert simulator.state.count_calls("DescribeImages") == calls
    [paused] = await pauses.listed(engine.pool)
    assert (paused.code, paused.scope_region) == (code, scope_region)
    assert (paused.action, paused.policy, paused.instance_id) == ("DescribeImages", "nightly", A)
    assert len(await events(engine.pool, "account.paused")) == 1
    [line] = [line for line in captured_logs.lines if line["event"] == "account.paused"]
    assert (line["account"], line["scope_region"], line["code"]) == (ACCOUNT, scope_region, code)
    assert paused.resume_command in line["hint"]
    assert await _job_state(engine.pool, job) == ("waiting_image", None)
    simulator.set_account_error(None, ("DescribeImages",), region=REGION)
    await pauses.resume(engine.pool, ACCOUNT, "operator", scope_region=scope_region)
    assert await tracker.poll_once(engine) == 0
    assert await _job_state(engine.pool, job) == ("succeeded", "image_ready")


async def test_failing_describe_images_is_asked_once_per_min_interval_at_most(
    engine: EngineContext, simulator: Simulator
) -> None:
    """A failed poll is not repeated sooner than tracker_min_interval, even when due by timing."""
    policy = await add_policy(engine.pool)
    min_interval = engine.settings.tracker_min_interval
    # Builds of 0.3 s, learned from the first image: the second is then expected ready soon, and
    # without the hold the loop would look again every 10 ms of the budget while that lasts.
    simulator.set_create_delay(0.3, 0.3)
    stop = asyncio.Event()
    task = asyncio.create_task(tracker.run(engine, stop))
    first = await add_job(engine.pool, policy, A, await make_image(engine, A), datetime.now(UTC))

    async def first_done() -> bool:
        return (await _job_state(engine.pool, first))[0] == "succeeded"

    await wait_for(first_done)
    simulator.set_faults(Faults(internal_error_rate=1.0), action="DescribeImages")
    loop = asyncio.get_running_loop()
    before, started = simulator.state.count_calls("DescribeImages"), loop.time()
    await add_job(engine.pool, policy, B, await make_image(engine, B), datetime.now(UTC))

    async def failed_a_few_times() -> bool:
        return simulator.state.count_calls("DescribeImages") - before >= 6

    await wait_for(failed_a_few_times)
    ticks = (loop.time() - started) / min_interval
    calls = simulator.state.count_calls("DescribeImages") - before
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    # One call per poll, polls at least a min interval apart: one per tick, plus the first
    # (the new image) and one answered as the count was read.
    assert calls <= ticks + 2, (calls, ticks)
