"""The scheduler: idempotent slots, one catch-up run after downtime, NOTIFY, backup-now."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from orchestrator import scheduler
from orchestrator.context import EngineContext
from orchestrator.errors import UsageError
from orchestrator.limiter import Limiters
from orchestrator.scheduler import Scheduler
from orchestrator.simulator.runner import Simulator
from orchestrator.tencent.models import Filter
from tests.fixtures.engine import insert_policy
from tests.fixtures.logs import LogCapture
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import TEST_REGION, make_sim_config

T0 = datetime(2026, 11, 23, 10, 7, tzinfo=UTC)


async def _runs(pool: asyncpg.Pool) -> list[datetime]:
    return [r["slot"] for r in await pool.fetch("SELECT slot FROM runs ORDER BY slot")]


async def test_pass_is_idempotent_and_records_missing_instances_as_skipped(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """Two passes in one slot make one run; tagged and explicit targets; gone ids skipped."""
    explicit = simulator.config.instances[0].instance_id
    await insert_policy(
        pg_pool,
        "idem",
        instance_ids=[explicit, "ins-gone0001"],
        instance_tags={"role": "db"},
        schedule="0 * * * *",
        window="2 hours",
    )
    now = datetime.now(UTC)
    first = await scheduler.schedule_pass(engine_ctx, now)
    again = await scheduler.schedule_pass(engine_ctx, now + timedelta(seconds=30))
    assert len(first) == 1
    assert again == []
    rows = await pg_pool.fetch("SELECT instance_id, state, reason FROM jobs")
    by_id = {r["instance_id"]: (r["state"], r["reason"]) for r in rows}
    tagged = {i.instance_id for i in simulator.config.instances if i.tags.get("role") == "db"}
    assert by_id.pop("ins-gone0001") == ("skipped", "instance_gone")
    assert set(by_id) == tagged | {explicit}
    assert {s for s, _ in by_id.values()} == {"pending"}


async def test_after_downtime_only_the_latest_missed_slot_runs(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """Hours of missed hourly slots produce one run, for the most recent slot."""
    await insert_policy(
        pg_pool, "hourly", instance_tags={"role": "web"}, schedule="0 * * * *", window="1 day"
    )
    now = datetime.now(UTC)
    await scheduler.schedule_pass(engine_ctx, now - timedelta(hours=6))
    await scheduler.schedule_pass(engine_ctx, now)
    latest = now.replace(minute=0, second=0, microsecond=0)
    assert await _runs(pg_pool) == [latest - timedelta(hours=6), latest]


async def test_slot_whose_window_closed_is_not_scheduled(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool
) -> None:
    """A slot older than the completion window is left alone: its jobs could only expire."""
    await insert_policy(
        pg_pool, "late", instance_tags={"role": "web"}, schedule="0 0 1 1 *", window="1 hour"
    )
    assert await scheduler.schedule_pass(engine_ctx, datetime.now(UTC)) == []


async def test_backup_now_twice_in_a_minute_creates_one_run(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool
) -> None:
    """backup-now uses the current minute as its slot, so a second call creates nothing."""
    await insert_policy(pg_pool, "manual", instance_tags={"role": "web"})
    first = await scheduler.backup_now(engine_ctx, "manual", T0 + timedelta(seconds=5))
    second = await scheduler.backup_now(engine_ctx, "manual", T0 + timedelta(seconds=55))
    assert first.created
    assert not second.created
    assert first.run_id == second.run_id
    assert first.slot == T0.replace(second=0)
    jobs = await pg_pool.fetchval("SELECT count(*) FROM jobs")
    assert jobs == first.jobs > 0
    with pytest.raises(UsageError, match="no policy named"):
        await scheduler.backup_now(engine_ctx, "nope")


async def test_policy_change_is_picked_up_through_notify(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool
) -> None:
    """A policy inserted while the loop sleeps is scheduled long before the next poll."""
    ctx = replace(engine_ctx, settings=replace(engine_ctx.settings, poll_interval=600.0))
    stop = asyncio.Event()
    loop_ = Scheduler(ctx)
    loop = asyncio.create_task(loop_.run(stop))
    try:

        async def first_pass_done() -> bool:
            return loop_.passes >= 1

        await wait_for(first_pass_done, within=10)
        assert await _runs(pg_pool) == []
        await insert_policy(pg_pool, "notified", instance_tags={"role": "web"})

        async def scheduled() -> bool:
            return len(await _runs(pg_pool)) == 1

        await wait_for(scheduled, within=10)
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)


FLEET = 250
BACKUP_DAILY = [Filter("tag:backup", ("daily",))]


def _describe_calls(ctx: EngineContext) -> int:
    limiter = ctx.client("default").limiter
    assert isinstance(limiter, Limiters)
    return limiter.stats("default", "DescribeInstances").calls


@pytest.mark.parametrize("sim_config", [make_sim_config(FLEET)])
@pytest.mark.parametrize(
    ("hint", "calls"),
    [(None, 3), (FLEET, 3), (450, 5), (120, 3), (0, 3)],
)
async def test_tagged_targets_are_complete_whatever_the_count_learned_before(
    engine_ctx: EngineContext,
    simulator: Simulator,
    monkeypatch: pytest.MonkeyPatch,
    hint: int | None,
    calls: int,
) -> None:
    """Pages fetched together from a known count; a stale count costs calls, never targets."""
    monkeypatch.setattr(scheduler, "_known_counts", {})
    client = engine_ctx.client("default")
    if hint is not None:
        scheduler._known_counts[("default", TEST_REGION, tuple(BACKUP_DAILY))] = hint
    ids = await scheduler.tagged_instances(client, TEST_REGION, BACKUP_DAILY)
    assert sorted(ids) == sorted(i.instance_id for i in simulator.config.instances)
    assert _describe_calls(engine_ctx) == calls
    # What it saw is remembered: the next resolution asks for every page at once.
    assert scheduler._known_counts[("default", TEST_REGION, tuple(BACKUP_DAILY))] == FLEET


@pytest.mark.parametrize("sim_config", [make_sim_config(FLEET)])
async def test_count_is_learned_once_shortly_before_a_slot(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tag query's count is probed once when its slot is near, not when it is far or imminent."""
    monkeypatch.setattr(scheduler, "_known_counts", {})
    await insert_policy(pg_pool, "hourly", instance_tags={"backup": "daily"}, schedule="0 * * * *")
    found = await scheduler.load_policies(pg_pool)
    top = datetime(2026, 11, 23, 11, 0, tzinfo=UTC)
    for early in (timedelta(minutes=30), timedelta(seconds=0.5)):
        await scheduler.learn_counts(engine_ctx, found, top - early)
    assert scheduler._known_counts == {}
    for _ in range(2):
        await scheduler.learn_counts(engine_ctx, found, top - timedelta(seconds=30))
    assert scheduler._known_counts == {("default", TEST_REGION, tuple(BACKUP_DAILY)): FLEET}
    assert _describe_calls(engine_ctx) == 1


async def test_only_the_lease_holder_resolves_targets(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """A pass that does not drive the account makes no call and no run; the holder's does."""
    await insert_policy(
        pg_pool, "leased", instance_tags={"role": "db"}, schedule="0 * * * *", window="2 hours"
    )
    now = datetime.now(UTC)
    assert await scheduler.schedule_pass(engine_ctx, now, driven=frozenset) == []
    assert simulator.state.count_calls("DescribeInstances") == 0
    assert await _runs(pg_pool) == []
    held = await scheduler.schedule_pass(engine_ctx, now, driven=lambda: {"default"})
    assert [s.created for s in held] == [True]


# -- answers that mean "nothing to do" or "wrong region", not "try again" ---------------------

UNKNOWN_KEY = "nobody-has-this"
OTHER_REGION = "ap-shanghai"
UNSERVED = "eu-nowhere"


async def _passes(ctx: EngineContext, start: datetime, count: int = 3) -> None:
    # Passes 10 s apart, all in the slot of `start` (T0 is 7 minutes past it).
    for n in range(count):
        await scheduler.schedule_pass(ctx, start + timedelta(seconds=10 * n))


def _logged(capture: LogCapture, event: str) -> list[dict[str, object]]:
    return [line for line in capture.lines if line["event"] == event]


@pytest.mark.parametrize("sim_config", [replace(make_sim_config(), check_tag_keys=True)])
async def test_unknown_tag_key_is_one_run_with_no_targets(
    engine_ctx: EngineContext,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    captured_logs: LogCapture,
) -> None:
    """TagKeyNotFound is zero targets: one empty run, one schedule.no_targets, no failure."""
    await insert_policy(
        pg_pool, "untagged", instance_tags={UNKNOWN_KEY: "yes"}, schedule="0 * * * *"
    )
    await _passes(engine_ctx, T0)
    [event] = _logged(captured_logs, "schedule.no_targets")
    assert event["reason"] == f"no instance carries tag key `{UNKNOWN_KEY}`"
    assert not _logged(captured_logs, "schedule.failed")
    assert not _logged(captured_logs, "schedule.retry")
    assert simulator.state.count_calls("DescribeInstances") == 1
    assert len(await _runs(pg_pool)) == 1
    assert await pg_pool.fetchval("SELECT count(*) FROM jobs") == 0
    details = await pg_pool.fetchval("SELECT details FROM events WHERE kind = 'run.created'")
    assert details["no_targets"] == event["reason"]


@pytest.mark.parametrize(
    ("sim_config", "region", "code"),
    [
        (replace(make_sim_config(), regions=(TEST_REGION,)), UNSERVED, "InvalidParameterValue"),
        (
            replace(make_sim_config(), actions_not_offered={OTHER_REGION: ("DescribeInstances",)}),
            OTHER_REGION,
            "UnsupportedRegion",
        ),
    ],
    ids=["unserved", "not-offered"],
)
async def test_refused_region_is_logged_once_per_slot(
    engine_ctx: EngineContext,
    pg_pool: asyncpg.Pool,
    captured_logs: LogCapture,
    region: str,
    code: str,
) -> None:
    """A region the API refuses: no run, one schedule.region_refused per slot, no retry storm."""
    await insert_policy(
        pg_pool, "far", instance_tags={"backup": "daily"}, schedule="0 * * * *", region=region
    )
    await _passes(engine_ctx, T0)
    [event] = _logged(captured_logs, "schedule.region_refused")
    assert (event["region"], event["code"], event["policy"]) == (region, code, "far")
    assert f"region {region!r} of policy 'far'" in str(event["error"])
    assert not _logged(captured_logs, "schedule.failed")
    assert _describe_calls(engine_ctx) == 1
    assert await _runs(pg_pool) == []
    rows = await pg_pool.fetch("SELECT region, reason FROM events WHERE kind = $1", event["event"])
    assert [(r["region"], r["reason"]) for r in rows] == [(region, code)]
    # The next slot asks once more: the region may have been fixed, or be served by now.
    await _passes(engine_ctx, T0 + timedelta(hours=1))
    assert len(_logged(captured_logs, "schedule.region_refused")) == 2
    assert _describe_calls(engine_ctx) == 2


@pytest.mark.parametrize("sim_config", [replace(make_sim_config(), check_tag_keys=True)])
async def test_unknown_tag_key_is_counted_as_zero_once(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probing a tag query whose key no instance carries learns 0, so it is not probed again."""
    monkeypatch.setattr(scheduler, "_known_counts", {})
    await insert_policy(
        pg_pool, "untagged", instance_tags={UNKNOWN_KEY: "yes"}, schedule="0 * * * *"
    )
    found = await scheduler.load_policies(pg_pool)
    for _ in range(2):
        await scheduler.learn_counts(engine_ctx, found, T0 + timedelta(minutes=52, seconds=30))
    query = ("default", TEST_REGION, (Filter(f"tag:{UNKNOWN_KEY}", ("yes",)),))
    assert scheduler._known_counts == {query: 0}
    assert _describe_calls(engine_ctx) == 1
