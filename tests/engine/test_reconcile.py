"""Reconciliation: a lost database gets its images back; images deleted outside are marked gone."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from orchestrator import naming, reconcile, scheduler, sweep
from orchestrator.context import EngineContext
from orchestrator.daemon import engine_context
from orchestrator.db import pool
from orchestrator.simulator.config import SimConfig
from orchestrator.simulator.records import SimImage
from orchestrator.simulator.runner import Simulator
from tests.fixtures.daemon import DaemonProcess, config_toml, daemon_env
from tests.fixtures.engine import drain, fast_settings, insert_policy
from tests.fixtures.pg import _database
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import TEST_REGION, assert_sim_clean, make_sim_config

POLICY = "keep"
OLD_SLOT = datetime(2020, 1, 1, tzinfo=UTC)


@pytest.fixture
def sim_config() -> SimConfig:
    """Three instances; deletions linger as DELETING briefly, as on the real API."""
    return replace(make_sim_config(instances=3), delete_delay=0.3)


@pytest.fixture
def new_dsn(pg_admin_dsn: str, pg_template: str) -> Iterator[str]:
    """A second, empty (migrated) database: the one an operator starts over with."""
    yield from _database(pg_admin_dsn, pg_template)


@pytest.fixture
async def new_ctx(new_dsn: str, simulator: Simulator) -> AsyncIterator[EngineContext]:
    """An engine context on the new database."""
    db = await pool.create_pool_dsn(new_dsn, min_size=1, max_size=5)
    try:
        async with engine_context(fast_settings(new_dsn, simulator.url), db) as ctx:
            yield ctx
    finally:
        await db.close()


def _ids(sim: Simulator) -> tuple[str, ...]:
    return tuple(i.instance_id for i in sim.config.instances)


async def _slots(ctx: EngineContext, *days: int) -> None:
    now = datetime.now(UTC)
    for back in days:
        for run in await scheduler.schedule_pass(ctx, now=now - timedelta(days=back)):
            assert await drain(ctx, run_id=run.run_id) == 0


def _look_alike(sim: Simulator, instance_id: str, tags: dict[str, str]) -> str:
    """An image with our exact naming and description but without this deployment's proof."""
    name = naming.image_name(POLICY, instance_id, OLD_SLOT)
    image = SimImage(
        image_id=sim.state.new_image_id(),
        name=name,
        account=sim.state.accounts[0],
        region=TEST_REGION,
        state="NORMAL",
        created_time="2020-01-01T00:05:00Z",
        instance_id=instance_id,
        tags=tags,
        description=naming.description(POLICY, instance_id, OLD_SLOT),
        ours=False,
    )
    sim.state.add_image(image, delay=None)
    return image.image_id


def _policy_file(path: Path, ids: tuple[str, ...]) -> Path:
    listed = ", ".join(f'"{i}"' for i in ids)
    path.write_text(
        f'[[policies]]\nname = "{POLICY}"\nregion = "{TEST_REGION}"\nschedule = "0 0 * * *"\n'
        f'instance_ids = [{listed}]\ncompletion_window = "30d"\n'
        "[policies.retention]\nkeep_last = 1\n",
        encoding="utf-8",
    )
    return path


class Cli:
    """The command line on the new database; each call returns (exit code, its stdout)."""

    def __init__(self, process: DaemonProcess, home: Path) -> None:
        self.process = process
        self.home = home

    async def __call__(self, *args: str) -> tuple[int, str]:
        before = len(self.process.stdout())
        await self.process.start(*args)
        code = await self.process.wait(within=60)
        return code, self.process.stdout()[before:]


@pytest.fixture
def new_cli(new_dsn: str, simulator: Simulator, tmp_path: Path) -> Cli:
    """`cvm-backup ...` as a subprocess on the new database and the simulator."""
    config = config_toml(fast_settings(new_dsn, simulator.url), tmp_path / "config.toml")
    env = daemon_env(new_dsn, simulator.url, config, tmp_path)
    return Cli(DaemonProcess(env, tmp_path / "log"), tmp_path)


async def test_a_new_database_gets_its_images_back_and_retention_takes_over(
    engine_ctx: EngineContext,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    new_ctx: EngineContext,
    new_cli: Cli,
) -> None:
    """New database + policy apply + reconcile: status shows the images; the next slot prunes."""
    ids = _ids(simulator)
    await insert_policy(pg_pool, POLICY, instance_ids=ids, keep_last=2)
    await _slots(engine_ctx, 2, 1)
    before = await pg_pool.fetch("SELECT image_id, instance_id, slot FROM images")
    assert len(before) == 2 * len(ids)
    look_alikes = [
        _look_alike(simulator, ids[0], {naming.TAG_POLICY: POLICY}),
        _look_alike(simulator, ids[1], {naming.TAG_POLICY: POLICY, naming.TAG_DEPLOYMENT: "other"}),
    ]
    # The operator starts over: a new database, the same policy file.
    policies = _policy_file(new_cli.home / "p.toml", ids)
    assert (await new_cli("policy", "apply", str(policies)))[0] == 0
    code, dry = await new_cli("reconcile", "--dry-run")
    assert code == 0
    assert "would be: 6 adopted, 0 gone, 0 refreshed, 2 left alone" in dry
    assert await new_ctx.pool.fetchval("SELECT count(*) FROM images") == 0
    code, table = await new_cli("reconcile")
    assert code == 0, new_cli.process.stderr()[-2000:]
    assert table.count("adopted") >= 6
    assert all(image_id in table for image_id in look_alikes)
    adopted = await new_ctx.pool.fetch("SELECT image_id, instance_id, slot, job_id FROM images")
    assert sorted((r["image_id"], r["instance_id"], r["slot"]) for r in adopted) == sorted(
        (r["image_id"], r["instance_id"], r["slot"]) for r in before
    )
    assert {r["job_id"] for r in adopted} == {None}

    code, shown = await new_cli("status", "--json")
    assert code == 0
    newest = {r["instance_id"]: r for r in before if r["slot"] == max(b["slot"] for b in before)}
    assert {r["instance_id"]: r["latest_image"] for r in json.loads(shown)} == {
        i: newest[i]["image_id"] for i in ids
    }

    # The next slot: keep_last 1 now, so every image adopted goes once the new one is NORMAL.
    await _slots(new_ctx, 0)

    async def pruned() -> bool:
        await sweep.sweep(new_ctx, new_ctx.clients.keys())  # follows the deletions in flight
        gone = await new_ctx.pool.fetchval(
            "SELECT count(*) FROM images WHERE deleted_at IS NOT NULL AND job_id IS NULL"
        )
        return bool(gone == len(before))

    await wait_for(pruned, within=15)
    alive = {i.image_id for i in simulator.state.images.values() if i.alive}
    assert not alive & {r["image_id"] for r in before}
    assert set(look_alikes) <= alive
    assert_sim_clean(simulator)


async def test_an_image_deleted_outside_is_marked_gone_and_no_longer_the_newest(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """Deleted by hand: reconcile marks its row gone; the older image becomes the one kept."""
    ids = _ids(simulator)
    policy = await insert_policy(pg_pool, POLICY, instance_ids=ids, keep_last=2)
    await _slots(engine_ctx, 2, 1)
    target = ids[0]
    older, newer = await pg_pool.fetch(
        "SELECT image_id FROM images WHERE instance_id = $1 ORDER BY created_at", target
    )
    simulator.state.delete_image(simulator.state.images[newer["image_id"]], True)

    async def vanished() -> bool:
        return not simulator.state.images[newer["image_id"]].alive

    await wait_for(vanished, within=5)
    # Older than the listing-lag margin: "not listed" now means "gone".
    await pg_pool.execute("UPDATE images SET created_at = created_at - interval '1 hour'")
    report = await reconcile.reconcile(engine_ctx, engine_ctx.clients.keys())
    assert [(f.action, f.image_id) for f in report.findings] == [("gone", newer["image_id"])]
    row = await pg_pool.fetchrow(
        "SELECT deleted_at, delete_reason FROM images WHERE image_id = $1", newer["image_id"]
    )
    assert row is not None
    assert row["deleted_at"] is not None
    assert row["delete_reason"] == "gone_outside"
    kinds = await pg_pool.fetch("SELECT kind FROM events WHERE image_id = $1", newer["image_id"])
    assert "image.gone_outside" in {k["kind"] for k in kinds}

    # keep_last 1: the other instances lose their older image; this one keeps its only one.
    await pg_pool.execute("UPDATE policies SET keep_last = 1 WHERE id = $1", policy)
    result = await sweep.sweep(engine_ctx, engine_ctx.clients.keys())
    assert older["image_id"] not in result.deleted
    assert len(result.deleted) == len(ids) - 1
    assert simulator.state.images[older["image_id"]].alive
