"""/metrics after real activity: API calls through a real client, limiter waits, table numbers."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import aiohttp
import asyncpg
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from orchestrator import pauses
from orchestrator.config import Settings
from orchestrator.context import EngineContext
from orchestrator.daemon import Engine, Signals
from orchestrator.health import serve_health
from orchestrator.metrics import Metrics
from orchestrator.tencent.errors import TencentError
from tests.fixtures.operator import insert_image, insert_policy
from tests.fixtures.sim import TEST_QUOTA, TEST_REGION
from tests.operator.scrape import scrape, value

SLOT = datetime(2024, 5, 1, 3, 0, tzinfo=UTC)
INSTANCE_TS = "cvm_backup_instance_last_success_timestamp_seconds"
DAY = 86400.0


async def insert_job(
    pool: asyncpg.Pool, policy_id: int, instance_id: str, state: str, finished_ago: float | None
) -> None:
    """One job of the policy's run at SLOT; terminal ones finished `finished_ago` seconds ago."""
    run_id = await pool.fetchval(
        "INSERT INTO runs (policy_id, slot) VALUES ($1, $2)"
        " ON CONFLICT (policy_id, slot) DO UPDATE SET trigger = runs.trigger RETURNING id",
        policy_id,
        SLOT,
    )
    await pool.execute(
        "INSERT INTO jobs (run_id, policy_id, account, region, instance_id, slot, image_name,"
        " deadline, state, image_id, finished_at)"
        " VALUES ($1, $2, 'default', $3, $4, $5::timestamptz, $6,"
        " $5::timestamptz + interval '1 day', $7,"
        " CASE WHEN $7::text = 'succeeded' THEN 'img-done' END,"
        " now() - make_interval(secs => $8::float8))",
        run_id,
        policy_id,
        TEST_REGION,
        instance_id,
        SLOT,
        f"cvmbk-web-{instance_id}",
        state,
        finished_ago,
    )


async def create_images(ctx: EngineContext, instance_ids: list[str]) -> None:
    """Real CreateImage calls for the instances, and one for an unknown instance."""
    client = ctx.client("default")
    for instance_id in instance_ids:
        await client.create_image(TEST_REGION, instance_id=instance_id, name=f"m-{instance_id}")
    with pytest.raises(TencentError) as refused:
        await client.create_image(TEST_REGION, instance_id="ins-missing01", name="m-missing")
    assert refused.value.code == "InvalidInstanceId.NotFound"


async def test_metrics_after_activity(
    ctx: EngineContext,
    settings: Settings,
    http: aiohttp.ClientSession,
    instance_ids: list[str],
) -> None:
    """API calls by action and code, limiter waits, jobs, images, quota and backup age."""
    policy_id = await insert_policy(ctx.pool, "web", instance_ids[:3])
    await insert_job(ctx.pool, policy_id, instance_ids[0], "succeeded", finished_ago=3600)
    await insert_job(ctx.pool, policy_id, instance_ids[1], "failed", finished_ago=60)
    await insert_job(ctx.pool, policy_id, instance_ids[2], "pending", finished_ago=None)
    now = datetime.now(UTC)
    await insert_image(ctx.pool, policy_id, instance_ids[0], "img-old00001", now)
    await insert_image(ctx.pool, policy_id, instance_ids[1], "img-old00002", now, state="CREATING")
    async with serve_health(ctx, settings, metrics=Metrics(), quota_interval=3600) as url:
        await create_images(ctx, instance_ids[:3])
        samples = await scrape_until(http, url, "cvm_backup_image_quota")
    calls = "cvm_backup_api_calls_total"
    assert value(samples, calls, action="CreateImage", code="ok", region=TEST_REGION) == 3
    assert value(samples, calls, action="CreateImage", code="InvalidInstanceId.NotFound") == 1
    assert value(samples, calls, action="DescribeImageQuota", code="ok") == 1
    waits = "cvm_backup_limiter_wait_seconds_count"
    assert value(samples, waits, account="default", action="CreateImage") == 4
    wait_sum = value(samples, "cvm_backup_limiter_wait_seconds_sum", action="CreateImage")
    assert wait_sum is not None
    assert wait_sum > 0
    assert value(samples, "cvm_backup_image_quota", region=TEST_REGION) == TEST_QUOTA
    assert value(samples, "cvm_backup_database_up") == 1
    jobs = {s.labels["state"]: s.value for s in samples if s.name == "cvm_backup_jobs"}
    # Live states only, zeros included: finished jobs are the counter's, never a table count.
    assert jobs == {"pending": 1, "claimed": 0, "creating": 0, "waiting_image": 0}
    images = "cvm_backup_images"
    assert value(samples, images, region=TEST_REGION, state="NORMAL") == 1
    assert value(samples, images, region=TEST_REGION, state="CREATING") == 1
    # The newest good image (NORMAL, just recorded), not the newest job.
    age = value(samples, "cvm_backup_last_success_age_seconds", policy="web")
    assert age is not None
    assert 0 <= age < 600


async def scrape_until(http: aiohttp.ClientSession, url: str, name: str) -> list[Sample]:
    """Scrape until a metric with `name` appears (the quota is read in the background)."""
    async with asyncio.timeout(10):
        while True:
            samples = await scrape(http, url)
            if any(s.name == name for s in samples):
                return samples
            await asyncio.sleep(0.05)


async def test_metrics_after_engine_run(
    ctx: EngineContext, settings: Settings, http: aiohttp.ClientSession, instance_ids: list[str]
) -> None:
    """After the daemon's own --once pass, /metrics shows its jobs, images and calls."""
    await insert_policy(ctx.pool, "fleet", instance_ids)
    async with serve_health(ctx, settings, metrics=Metrics(), quota_interval=3600) as url:
        engine = Engine(ctx, Signals(), once=True)
        assert await asyncio.wait_for(engine.run(), timeout=30) == 0
        samples = await scrape(http, url)
    count = len(instance_ids)
    finished = "cvm_backup_jobs_finished_total"
    assert value(samples, finished, policy="fleet", outcome="succeeded") == count
    assert value(samples, finished, policy="fleet", outcome="failed", reason="image_failed") == 0
    assert value(samples, "cvm_backup_jobs", policy="fleet", state="pending") == 0
    assert value(samples, "cvm_backup_images", region=TEST_REGION, state="NORMAL") == count
    for instance_id in instance_ids:
        at = value(samples, INSTANCE_TS, policy="fleet", instance_id=instance_id)
        assert at is not None
        assert abs(at - time.time()) < 600
    # Daily at midnight with a two-day window: a good image may be a day plus two days old.
    assert value(samples, "cvm_backup_policy_rpo_seconds", policy="fleet") == 3 * DAY
    assert value(samples, "cvm_backup_policy_instances_overdue", policy="fleet") == 0
    calls = "cvm_backup_api_calls_total"
    assert value(samples, calls, action="CreateImage", code="ok") == count
    assert value(samples, calls, action="DescribeImages", code="ok")
    age = value(samples, "cvm_backup_last_success_age_seconds", policy="fleet")
    assert age is not None
    assert 0 <= age < 600


async def test_calls_after_stop_are_not_counted(
    ctx: EngineContext, settings: Settings, http: aiohttp.ClientSession, instance_ids: list[str]
) -> None:
    """Leaving serve_health detaches the observer: later calls do not reach the old metrics."""
    metrics = Metrics()
    async with serve_health(ctx, settings, metrics=metrics, quota_interval=3600):
        pass
    await ctx.client("default").create_image(TEST_REGION, instance_id=instance_ids[0], name="x")
    families = text_string_to_metric_families(metrics.render().decode())
    calls = [s for f in families for s in f.samples if s.name == "cvm_backup_api_calls_total"]
    assert calls == []


def test_registry_is_private() -> None:
    """Two Metrics never share series, and nothing lands in the global registry."""
    first, second = Metrics(), Metrics()
    first.api_call("default", "CreateImage", TEST_REGION, "ok")
    assert b'code="ok"' in first.render()
    assert b"CreateImage" not in second.render()
    assert not [m for m in REGISTRY.collect() if m.name.startswith("cvm_backup_")]


async def test_a_paused_account_shows_since_when(
    ctx: EngineContext, settings: Settings, http: aiohttp.ClientSession
) -> None:
    """A paused account has a paused-since gauge; a resumed one has none."""
    refused = TencentError("AuthFailure.SecretIdNotFound", "no such key")
    async with ctx.pool.acquire() as conn:
        await pauses.pause(
            conn, "default", refused, region=TEST_REGION, instance_id="ins-abc12345", first_probe=60
        )
    name = "cvm_backup_account_paused_since_timestamp_seconds"
    async with serve_health(ctx, settings, metrics=Metrics(), quota_interval=3600) as url:
        since = value(await scrape(http, url), name, account="default")
        assert since is not None
        assert abs(since - time.time()) < 600
        async with ctx.pool.acquire() as conn:
            await pauses.resume(conn, "default", "operator")
        assert value(await scrape(http, url), name, account="default") is None
