"""Per-instance freshness, RPO and overdue gauges; the finished-jobs counter; lease-held serving."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import pytest

from orchestrator import __version__, pauses
from orchestrator.accounts import AccountLeases
from orchestrator.config import Settings
from orchestrator.context import EngineContext
from orchestrator.db import pool as db_pool
from orchestrator.health import serve_health
from orchestrator.metrics import MAX_CODES, OTHER, Metrics
from orchestrator.simulator.runner import Simulator
from orchestrator.tencent.errors import TencentError
from tests.fixtures.operator import insert_image, insert_policy
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import TEST_REGION
from tests.operator.scrape import scrape, value
from tests.operator.seed import add_job, midnight

INSTANCE_TS = "cvm_backup_instance_last_success_timestamp_seconds"
OVERDUE = "cvm_backup_policy_instances_overdue"
FINISHED = "cvm_backup_jobs_finished_total"
DAY = 86400.0


async def test_each_target_instance_shows_its_own_newest_good_image(
    ctx: EngineContext,
    settings: Settings,
    http: aiohttp.ClientSession,
    instance_ids: list[str],
) -> None:
    """A failing instance is visible per instance and counted overdue; new and gone ones are not."""
    fresh, stale, never, new, gone = instance_ids[:5]
    policy = await insert_policy(ctx.pool, "web", instance_ids[:5])
    now = datetime.now(UTC)
    # Five days ago everything but `never` worked; yesterday and today only `fresh` did.
    for days_ago in (5, 1, 0):
        slot = midnight(days_ago)
        await add_job(ctx.pool, policy, fresh, slot, "succeeded")
        await insert_image(ctx.pool, policy, fresh, f"img-f{days_ago}", now - timedelta(days_ago))
        await add_job(ctx.pool, policy, stale, slot, "succeeded" if days_ago == 5 else "failed")
        await add_job(ctx.pool, policy, never, slot, "failed", reason="image_failed")
    await insert_image(ctx.pool, policy, stale, "img-stale5", now - timedelta(days=5))
    # Failed and then deleted outside: no good image left, like `never`.
    await insert_image(ctx.pool, policy, gone, "img-gone05", now - timedelta(days=5))
    await ctx.pool.execute(
        "UPDATE images SET deleted_at = now(), delete_requested_at = now(),"
        " delete_reason = 'gone_outside' WHERE image_id = 'img-gone05'"
    )
    await add_job(ctx.pool, policy, gone, midnight(5), "succeeded")
    await add_job(ctx.pool, policy, gone, midnight(0), "failed")
    # Its first job still running and within its window: not late yet, so not shown.
    await add_job(ctx.pool, policy, new, midnight(0), "pending")
    async with serve_health(ctx, settings, metrics=Metrics(), quota_interval=3600) as url:
        samples = await scrape(http, url)
    shown = {s.labels["instance_id"]: s.value for s in samples if s.name == INSTANCE_TS}
    assert set(shown) == {fresh, stale, never, gone}
    assert abs(shown[fresh] - now.timestamp()) < 600
    assert abs(shown[stale] - (now - timedelta(days=5)).timestamp()) < 600
    assert shown[never] == shown[gone] == 0
    assert value(samples, "cvm_backup_policy_rpo_seconds", policy="web") == 3 * DAY
    assert value(samples, OVERDUE, policy="web") == 3  # stale, never, gone
    # The policy-wide gauge keeps its meaning, the newest of any instance: it hides them.
    newest = value(samples, "cvm_backup_last_success_timestamp_seconds", policy="web")
    assert newest == pytest.approx(shown[fresh])


async def test_targets_come_from_the_newest_run_without_skipped_or_disabled(
    ctx: EngineContext, settings: Settings, http: aiohttp.ClientSession, instance_ids: list[str]
) -> None:
    """An instance that left the policy, a skipped one and a disabled policy are not targets."""
    left, skipped, kept = instance_ids[:3]
    policy = await insert_policy(ctx.pool, "web", [skipped, kept])
    await add_job(ctx.pool, policy, left, midnight(3), "failed")
    await add_job(ctx.pool, policy, skipped, midnight(0), "skipped", reason="instance_gone")
    await add_job(ctx.pool, policy, kept, midnight(0), "failed")
    off = await insert_policy(ctx.pool, "off", [kept])
    await add_job(ctx.pool, off, kept, midnight(0), "failed")
    await ctx.pool.execute("UPDATE policies SET enabled = false WHERE id = $1", off)
    async with serve_health(ctx, settings, metrics=Metrics(), quota_interval=3600) as url:
        samples = await scrape(http, url)
    shown = {
        (s.labels["policy"], s.labels["instance_id"]) for s in samples if s.name == INSTANCE_TS
    }
    assert shown == {("web", kept)}
    assert value(samples, OVERDUE, policy="off") is None
    assert value(samples, "cvm_backup_policy_rpo_seconds", policy="off") is None


async def test_finished_jobs_count_once_each_from_the_start(
    ctx: EngineContext, settings: Settings, http: aiohttp.ClientSession, instance_ids: list[str]
) -> None:
    """The counter starts at 0, counts each job once, catches late commits, bounds reasons."""
    policy = await insert_policy(ctx.pool, "web", instance_ids)
    slot = midnight(0)
    await add_job(ctx.pool, policy, instance_ids[0], slot, "failed", finished_ago=30)
    async with serve_health(ctx, settings, metrics=Metrics(), quota_interval=3600) as url:
        started = time.monotonic()
        first = await scrape(http, url)
        await add_job(ctx.pool, policy, instance_ids[1], slot, "succeeded", reason="image_ready")
        await add_job(ctx.pool, policy, instance_ids[2], slot, "failed", reason="quota_exhausted")
        second = await scrape(http, url)
        await asyncio.sleep(0.5)
        third = await scrape(http, url)
        # A transaction that began after the start but before the last scrape commits now.
        late = (time.monotonic() - started) / 2
        await add_job(
            ctx.pool, policy, instance_ids[3], slot, "expired", reason="made-up", finished_ago=late
        )
        fourth = await scrape(http, url)
    # Before the start: not ours to count; but every known series is there, at 0.
    assert value(first, FINISHED, outcome="failed", reason="permanent_error") == 0
    assert value(first, FINISHED, outcome="failed", reason="quota_exhausted") == 0
    for samples in (second, third, fourth):
        assert value(samples, FINISHED, outcome="succeeded", reason="image_ready") == 1
        assert value(samples, FINISHED, outcome="failed", reason="quota_exhausted") == 1
    assert value(third, FINISHED, outcome="expired", reason=OTHER) is None
    assert value(fourth, FINISHED, outcome="expired", reason=OTHER) == 1
    assert value(fourth, FINISHED, outcome="expired", reason="window_closed") == 0


async def test_only_the_lease_holder_serves_database_numbers(
    ctx: EngineContext, settings: Settings, http: aiohttp.ClientSession, instance_ids: list[str]
) -> None:
    """Two replicas on one account: the holder serves the tables; the other only its process."""
    policy = await insert_policy(ctx.pool, "web", instance_ids[:2])
    await add_job(ctx.pool, policy, instance_ids[0], midnight(0), "pending")
    await add_job(ctx.pool, policy, instance_ids[1], midnight(0), "failed")
    holder = AccountLeases(ctx.clients, lambda: db_pool.connect(settings))
    other = AccountLeases(ctx.clients, lambda: db_pool.connect(settings))
    try:
        await holder.try_once()
        await other.try_once()
        assert holder.held() == {"default"}
        assert not other.held()
        served = []
        for leases in (holder, other):
            async with serve_health(
                ctx, settings, metrics=Metrics(), quota_interval=0.05, held=leases.held
            ) as url:
                served.append(await scrape(http, url))
    finally:
        await holder.close()
        await other.close()
    held, idle = served
    assert value(held, "cvm_backup_account_lease_held", account="default") == 1
    assert value(held, "cvm_backup_jobs", policy="web", state="pending") == 1
    assert value(held, INSTANCE_TS, policy="web", instance_id=instance_ids[1]) == 0
    assert value(idle, "cvm_backup_account_lease_held", account="default") == 0
    assert value(idle, "cvm_backup_database_up") == 1
    table_metrics = {"cvm_backup_jobs", INSTANCE_TS, OVERDUE, FINISHED, "cvm_backup_image_quota"}
    assert not [s for s in idle if s.name in table_metrics]
    # Nor does it call the account's API for the quota: only the holder drives it.
    assert value(idle, "cvm_backup_api_calls_total", action="DescribeImageQuota") is None


async def test_build_info_and_the_standard_collectors(
    pg_pool: asyncpg.Pool, http: aiohttp.ClientSession
) -> None:
    """build_info carries the version; process, platform and GC collectors are served."""
    async with serve_health(pg_pool, Settings(metrics_address="127.0.0.1:0")) as url:
        samples = await scrape(http, url)
    assert value(samples, "cvm_backup_build_info", version=__version__) == 1
    names = {s.name for s in samples}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"} <= names
    assert "python_gc_objects_collected_total" in names


def test_api_codes_are_bounded() -> None:
    """Codes that are not Tencent-shaped, or past MAX_CODES distinct ones, count as other."""
    metrics = Metrics()
    for n in range(MAX_CODES + 5):
        metrics.api_call("default", "CreateImage", TEST_REGION, f"Invented.Code{n}")
    metrics.api_call("default", "CreateImage", TEST_REGION, "bad code\n{}")
    metrics.api_call("default", "CreateImage", TEST_REGION, "Invented.Code0")
    text = metrics.render().decode()
    codes = {
        line.split('code="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("cvm_backup_api_calls_total{")
    }
    assert len(codes) == MAX_CODES + 1
    assert OTHER in codes
    assert f'code="Invented.Code0",region="{TEST_REGION}"}} 2.0' in text


async def test_the_quota_is_not_read_for_a_paused_account(
    ctx: EngineContext,
    settings: Settings,
    http: aiohttp.ClientSession,
    simulator: Simulator,
    instance_ids: list[str],
) -> None:
    """A paused account's API is left alone: no DescribeImageQuota for the gauge until resumed."""
    await insert_policy(ctx.pool, "web", instance_ids[:1])
    refused = TencentError("InvalidAccount.InsufficientBalance", "in arrears")
    async with ctx.pool.acquire() as conn:
        await pauses.pause(
            conn,
            "default",
            refused,
            region=TEST_REGION,
            instance_id=instance_ids[0],
            first_probe=60,
        )
    async with serve_health(ctx, settings, metrics=Metrics(), quota_interval=0.05) as url:
        await asyncio.sleep(0.3)  # several quota rounds
        paused = await scrape(http, url)
        calls_while_paused = simulator.state.count_calls("DescribeImageQuota")
        async with ctx.pool.acquire() as conn:
            await pauses.resume(conn, "default", "operator")
        await wait_for(lambda: _has(http, url, "cvm_backup_image_quota"), within=10)
    assert value(paused, "cvm_backup_image_quota", account="default") is None
    assert calls_while_paused == 0
    assert simulator.state.count_calls("DescribeImageQuota") > 0


async def _has(http: aiohttp.ClientSession, url: str, name: str) -> bool:
    return any(s.name == name for s in await scrape(http, url))
