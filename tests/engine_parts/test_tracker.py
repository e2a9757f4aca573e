"""The tracker against real Postgres and the real simulator (on a clock the test moves)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from datetime import timedelta

import pytest
from structlog.testing import capture_logs

from orchestrator import pauses, rotation, tracker
from orchestrator.config import Settings
from orchestrator.context import EngineContext
from orchestrator.simulator.config import Faults, SimConfig
from orchestrator.simulator.runner import Simulator
from orchestrator.tencent.errors import TencentError
from tests.engine_parts.helpers import (
    ACCOUNT,
    FAILING,
    INSTANCES,
    NOW,
    REGION,
    add_job,
    add_policy,
    alive,
    events,
    history,
    make_image,
    record_image,
)
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import SimClock

A, B, _ = INSTANCES
LONG = (60.0, 60.0)  # seconds CREATING, until the test advances the simulator's clock


async def _job(engine: EngineContext, job_id: int) -> dict[str, object]:
    row = await engine.pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    assert row is not None
    return dict(row)


async def test_ready_image_succeeds_its_job_and_applies_retention(
    engine: EngineContext, simulator: Simulator, sim_clock: SimClock
) -> None:
    """CREATING keeps the job waiting; NORMAL succeeds it, records the image, runs retention."""
    policy = await add_policy(engine.pool, keep_last=1)
    [old] = await history(engine, policy, A, 1)
    simulator.state.create_delay = LONG
    image = await make_image(engine, A)
    job = await add_job(engine.pool, policy, A, image, NOW)
    assert await tracker.poll_once(engine) == 1
    assert (await _job(engine, job))["state"] == "waiting_image"
    sim_clock.advance(120)
    with capture_logs() as logs:
        assert await tracker.poll_once(engine) == 0
    state = await _job(engine, job)
    assert (state["state"], state["reason"]) == ("succeeded", "image_ready")
    assert state["finished_at"] is not None
    row = await engine.pool.fetchrow("SELECT * FROM images WHERE image_id = $1", image)
    assert row is not None
    assert (row["state"], row["size_gb"], row["job_id"]) == ("NORMAL", 50, job)
    assert row["ready_at"] is not None
    assert not alive(simulator, old)
    names = [e["event"] for e in logs]
    assert (
        names.index("image.ready") < names.index("job.succeeded") < names.index("retention.deleted")
    )
    assert [r["image_id"] for r in await events(engine.pool, "job.succeeded")] == [image]


async def test_createfailed_fails_the_job_and_frees_the_quota(
    engine: EngineContext, simulator: Simulator, sim_clock: SimClock
) -> None:
    """CREATEFAILED: job failed with a code, the image deleted (intent first, with snapshots)."""
    policy = await add_policy(engine.pool)
    simulator.state.create_delay = LONG
    image = await make_image(engine, FAILING)
    job = await add_job(engine.pool, policy, FAILING, image, NOW)
    await record_image(engine.pool, image, policy, FAILING, NOW, state="CREATING")
    sim_clock.advance(120)
    with capture_logs() as logs:
        assert await tracker.poll_once(engine) == 0
    state = await _job(engine, job)
    assert (state["state"], state["last_error_code"]) == ("failed", tracker.FAILED_CODE)
    assert "CREATEFAILED" in str(state["last_error_message"])
    assert not alive(simulator, image)
    assert [d.delete_binded_snap for d in simulator.state.deletions] == [True]
    row = await engine.pool.fetchrow("SELECT * FROM images WHERE image_id = $1", image)
    assert row is not None
    assert row["state"] == "CREATEFAILED"
    assert row["delete_requested_at"] <= row["deleted_at"]
    assert [e["event"] for e in logs if e["event"].startswith(("image.", "job."))] == [
        "image.failed",
        "job.failed",
        "image.delete_sent",
        "image.deleted",
    ]


async def test_jobless_image_not_listed_past_the_listing_grace_vanishes(
    engine: EngineContext, simulator: Simulator
) -> None:
    """A jobless image not listed an hour after it was recorded is VANISHED; a younger one waits."""
    policy = await add_policy(engine.pool)
    old = NOW - tracker.LISTING_GRACE - timedelta(minutes=1)
    await record_image(engine.pool, "img-gone0001", policy, A, old, state="CREATING")
    young = NOW - timedelta(minutes=30)
    await record_image(engine.pool, "img-new00001", policy, B, young, state="CREATING")
    with capture_logs() as logs:
        assert await tracker.poll_once(engine) == 1
    row = await engine.pool.fetchrow("SELECT * FROM images WHERE image_id = 'img-gone0001'")
    assert row is not None
    assert (row["state"], row["delete_reason"]) == ("VANISHED", "vanished")
    assert row["deleted_at"] is not None
    young_state = "SELECT state FROM images WHERE image_id = 'img-new00001'"
    assert await engine.pool.fetchval(young_state) == "CREATING"
    assert [e["image_id"] for e in logs if e["event"] == "image.vanished"] == ["img-gone0001"]
    assert [r["image_id"] for r in await events(engine.pool, "image.vanished")] == ["img-gone0001"]
    assert simulator.state.deletions == []


@pytest.fixture
def sim_config(sim_config: SimConfig, request: pytest.FixtureRequest) -> SimConfig:
    """The parts' simulator; parametrized indirectly, new images go unlisted that many seconds."""
    return replace(sim_config, list_lag=getattr(request, "param", 0.0))


@pytest.mark.parametrize("sim_config", [600.0], indirect=True)
async def test_unlisted_image_keeps_its_job_waiting_until_the_window_closes(
    engine: EngineContext, simulator: Simulator, sim_clock: SimClock
) -> None:
    """Not listed yet: the job waits, expires with its window, and the row later turns NORMAL."""
    policy = await add_policy(engine.pool)
    simulator.state.create_delay = LONG
    image = await make_image(engine, A)
    job = await add_job(engine.pool, policy, A, image, NOW - timedelta(hours=2))
    assert await engine.client(ACCOUNT).images_by_ids(REGION, [image]) == []
    assert await tracker.poll_once(engine) == 1
    assert (await _job(engine, job))["state"] == "waiting_image"
    # The window closes (the deadline moved, not the clock) while the image is still unlisted.
    await engine.pool.execute("UPDATE jobs SET deadline = now() - interval '1 second'")
    assert await tracker.poll_once(engine) == 1
    state = await _job(engine, job)
    assert (state["state"], state["reason"]) == ("expired", "window_closed")
    row = await engine.pool.fetchrow("SELECT * FROM images WHERE image_id = $1", image)
    assert row is not None
    assert (row["state"], row["job_id"], row["deleted_at"]) == ("CREATING", job, None)
    assert [r["job_id"] for r in await events(engine.pool, "job.expired")] == [job]
    sim_clock.advance(700)  # listed at last, and built
    assert await tracker.poll_once(engine) == 0
    assert await engine.pool.fetchval("SELECT state FROM images WHERE image_id = $1", image) == (
        "NORMAL"
    )
    assert (await _job(engine, job))["state"] == "expired"


async def test_polls_in_batches_of_100(engine: EngineContext, simulator: Simulator) -> None:
    """150 images in flight in one region take two DescribeImages calls."""
    policy = await add_policy(engine.pool)
    for n in range(150):
        image_id = f"img-b{n:07d}"
        await add_job(engine.pool, policy, A, image_id, NOW + timedelta(minutes=n))
        await record_image(engine.pool, image_id, policy, A, NOW + timedelta(hours=1))
    assert await tracker.poll_once(engine) == 150
    assert simulator.state.count_calls("DescribeImages") == 2


async def test_tracks_images_whose_job_already_ended(
    engine: EngineContext, simulator: Simulator, sim_clock: SimClock
) -> None:
    """A CREATING image without a waiting job (its job expired) is still followed to NORMAL."""
    policy = await add_policy(engine.pool)
    simulator.state.create_delay = LONG
    image = await make_image(engine, A)
    await record_image(engine.pool, image, policy, A, NOW, state="CREATING")
    assert await tracker.poll_once(engine) == 1
    sim_clock.advance(120)
    assert await tracker.poll_once(engine) == 0
    assert await engine.pool.fetchval("SELECT state FROM images WHERE image_id = $1", image) == (
        "NORMAL"
    )


async def test_run_follows_images_and_stops_promptly(
    engine: EngineContext, simulator: Simulator, sim_clock: SimClock
) -> None:
    """The loop picks up a new image, records its outcome, and exits when stop is set."""
    policy = await add_policy(engine.pool)
    stop = asyncio.Event()
    task = asyncio.create_task(tracker.run(engine, stop))
    simulator.state.create_delay = LONG
    image = await make_image(engine, A)
    job = await add_job(engine.pool, policy, A, image, NOW)
    sim_clock.advance(120)

    async def succeeded() -> bool:
        return (await _job(engine, job))["state"] == "succeeded"

    await wait_for(succeeded, within=10)
    stop.set()
    await asyncio.wait_for(task, timeout=5)


def test_interval_is_the_min_while_images_are_in_flight() -> None:
    """Idle: the max interval; any image in flight: the min, however few remain."""
    settings = Settings(tracker_min_interval=2.0, tracker_max_interval=30.0)
    assert tracker.next_interval(0, settings) == 30.0
    assert tracker.next_interval(1, settings) == 2.0
    assert tracker.next_interval(100, settings) == 2.0


def test_interval_keeps_polls_within_a_share_of_the_describe_budget() -> None:
    """A poll costs a call per 100 images; big fleets poll less often to stay in budget."""
    settings = Settings(
        tracker_min_interval=0.5,
        tracker_max_interval=30.0,
        limits={"DescribeImages": 40},
    )
    # 10 calls per second is a quarter of the limit of 40.
    assert tracker.next_interval(500, settings) == 0.5
    assert tracker.next_interval(1000, settings) == 1.0
    assert tracker.next_interval(4000, settings) == 4.0
    intervals = [tracker.next_interval(n, settings) for n in range(1, 10_000, 37)]
    assert intervals == sorted(intervals)
    # The polls' call rate never exceeds the share, whatever the fleet.
    assert all(
        math.ceil(n / 100) / tracker.next_interval(n, settings) <= 10 for n in range(1, 10_000, 37)
    )


def test_build_estimate_is_a_low_quantile_of_recent_builds() -> None:
    """The estimate sits at the fast end of recent builds, unmoved by a few odd fast ones."""
    clock = tracker.BuildClock()
    assert clock.estimate() is None
    clock.observe(-1.0)  # a record stamped after the answer: no information
    assert clock.estimate() is None
    for i in range(100):
        clock.observe(3.0 + i / 200)
    clock.observe(0.0)
    clock.observe(0.01)
    estimate = clock.estimate()
    assert estimate is not None
    assert 3.0 <= estimate <= 3.05


def test_build_estimate_follows_recent_builds_only() -> None:
    """Old samples age out, so the estimate follows builds that became slower."""
    clock = tracker.BuildClock(samples=10)
    for _ in range(10):
        clock.observe(1.0)
    for _ in range(10):
        clock.observe(5.0)
    assert clock.estimate() == 5.0


def test_poll_comes_just_after_the_latest_finish_expected_before_the_regular_one() -> None:
    """Builds ending before the regular poll are looked at as they end, not an interval late."""
    assert tracker.next_poll(0.0, [0.2, 0.3, 0.9], regular=0.5, earliest=0.1) == 0.3


def test_poll_stays_regular_when_no_build_is_expected_to_end_sooner() -> None:
    """Nothing expected before the regular time (or only long overdue): the regular time."""
    assert tracker.next_poll(0.0, [], regular=0.5, earliest=0.1) == 0.5
    assert tracker.next_poll(0.0, [0.7, 2.0], regular=0.5, earliest=0.1) == 0.5
    assert tracker.next_poll(0.0, [-tracker.RECHECK - 1], regular=0.5, earliest=0.1) == 0.5


def test_image_expected_ready_but_still_building_is_rechecked_at_the_budget_pace() -> None:
    """An estimate a little short is corrected by the next poll the budget allows."""
    assert tracker.next_poll(0.0, [-0.05], regular=0.5, earliest=0.1) == 0.1
    # A later expected finish is looked at anyway; the recheck rides along with it.
    assert tracker.next_poll(0.0, [-0.05, 0.4], regular=0.5, earliest=0.1) == 0.4


def test_timed_polls_stay_within_the_call_budget() -> None:
    """However builds are expected to end, a poll comes between `earliest` and the regular time."""
    settings = Settings()
    for in_flight in (1, 99, 100, 101, 350, 5000):
        earliest = tracker.poll_gap(in_flight, settings)
        regular = tracker.next_interval(in_flight, settings)
        # The earliest gap keeps a poll's calls within a quarter of DescribeImages' 40/s.
        assert math.ceil(in_flight / 100) / earliest <= 10 + 1e-9
        for finishes in ([0.0], [0.001, 0.002], [regular], [-0.1, 0.05], [regular + 1]):
            at = tracker.next_poll(0.0, finishes, regular=regular, earliest=earliest)
            assert earliest <= at <= regular


async def test_job_expires_when_its_window_closes_mid_build(
    engine: EngineContext, simulator: Simulator, sim_clock: SimClock
) -> None:
    """Past its deadline a waiting job expires; its image is still followed to NORMAL."""
    policy = await add_policy(engine.pool)
    simulator.state.create_delay = LONG
    image = await make_image(engine, A)
    job = await add_job(engine.pool, policy, A, image, NOW - timedelta(hours=7))
    await record_image(engine.pool, image, policy, A, NOW, state="CREATING")
    assert await tracker.poll_once(engine) == 1
    state = await _job(engine, job)
    assert (state["state"], state["reason"]) == ("expired", "window_closed")
    sim_clock.advance(120)
    assert await tracker.poll_once(engine) == 0
    assert await engine.pool.fetchval("SELECT state FROM images WHERE image_id = $1", image) == (
        "NORMAL"
    )
    assert (await _job(engine, job))["state"] == "expired"


async def test_failed_image_delete_is_finished_by_rotation(
    engine: EngineContext, simulator: Simulator, sim_clock: SimClock
) -> None:
    """The delete intent commits with the job's failure; if DeleteImages fails, rotation ends it."""
    policy = await add_policy(engine.pool)
    simulator.state.create_delay = LONG
    image = await make_image(engine, FAILING)
    job = await add_job(engine.pool, policy, FAILING, image, NOW)
    sim_clock.advance(120)
    simulator.set_faults(Faults(internal_error_rate=1.0), "DeleteImages")
    assert await tracker.poll_once(engine) == 0
    assert (await _job(engine, job))["state"] == "failed"
    row = await engine.pool.fetchrow("SELECT * FROM images WHERE image_id = $1", image)
    assert row is not None
    assert row["delete_requested_at"] is not None
    assert row["deleted_at"] is None
    assert alive(simulator, image)
    simulator.clear_faults()
    result = await rotation.rotate_for_quota(engine, ACCOUNT, REGION)
    assert result.deleted == (image,)  # the intent is finished even when no job needs room
    assert not alive(simulator, image)


async def test_images_of_a_paused_account_are_left_alone(
    engine: EngineContext, simulator: Simulator
) -> None:
    """While its account is paused the tracker makes no call for it; after resume it does."""
    policy = await add_policy(engine.pool)
    image = await make_image(engine, A)
    await record_image(engine.pool, image, policy, A, NOW, state="CREATING")
    refused = TencentError("AuthFailure.SecretIdNotFound", "gone")
    async with engine.pool.acquire() as conn:
        await pauses.pause(conn, ACCOUNT, refused, region=REGION, instance_id=A, first_probe=60)
    calls = simulator.state.count_calls("DescribeImages")
    assert await tracker.poll_once(engine) == 0
    assert simulator.state.count_calls("DescribeImages") == calls
    async with engine.pool.acquire() as conn:
        await pauses.resume(conn, ACCOUNT, "operator")
    await tracker.poll_once(engine)
    assert simulator.state.count_calls("DescribeImages") == calls + 1
