"""Test helpers: rows in the real schema, images made through the real simulator API."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from orchestrator.context import EngineContext
from orchestrator.simulator.runner import Simulator
from tests.fixtures.sim import TEST_REGION

ACCOUNT = "default"
REGION = TEST_REGION
INSTANCES = ("ins-good0001", "ins-good0002", "ins-good0003")
FAILING = "ins-fail0001"
NOW = datetime.now(UTC).replace(microsecond=0)
_names = itertools.count()


async def add_policy(pool: asyncpg.Pool, name: str = "nightly", **fields: Any) -> int:
    """A policy on every test instance; `fields` sets retention columns and options."""
    fields.setdefault("keep_last", 1)
    columns = ", ".join(["name", "region", "schedule", "instance_ids", *fields])
    marks = ", ".join(f"${i}" for i in range(1, len(fields) + 5))
    values = [name, REGION, "0 3 * * *", [*INSTANCES, FAILING], *fields.values()]
    sql = f"INSERT INTO policies ({columns}) VALUES ({marks}) RETURNING id"
    return int(await pool.fetchval(sql, *values))


async def add_job(
    pool: asyncpg.Pool, policy_id: int, instance_id: str, image_id: str, slot: datetime
) -> int:
    """A job of a run at `slot` waiting for `image_id` (what the dispatcher leaves behind)."""
    run_id = await pool.fetchval(
        "INSERT INTO runs (policy_id, slot) VALUES ($1, $2) ON CONFLICT (policy_id, slot)"
        " DO UPDATE SET slot = EXCLUDED.slot RETURNING id",
        policy_id,
        slot,
    )
    return int(
        await pool.fetchval(
            "INSERT INTO jobs (run_id, policy_id, account, region, instance_id, slot, image_name,"
            " state, deadline, image_id) VALUES ($1, $2, $3, $4, $5, $6, $7, 'waiting_image',"
            " $8, $9) RETURNING id",
            run_id,
            policy_id,
            ACCOUNT,
            REGION,
            instance_id,
            slot,
            f"cvmbk-test-{instance_id}-{next(_names)}",
            slot + timedelta(hours=6),
            image_id,
        )
    )


async def add_waiting(pool: asyncpg.Pool, policy_id: int, count: int) -> list[int]:
    """`count` pending jobs of one run that each still need a unit of quota; their ids."""
    run_id = await pool.fetchval(
        "INSERT INTO runs (policy_id, slot) VALUES ($1, $2) RETURNING id", policy_id, NOW
    )
    rows = await pool.fetch(
        "INSERT INTO jobs (run_id, policy_id, account, region, instance_id, slot, image_name,"
        " deadline) SELECT $1, $2, $3, $4, 'ins-need' || lpad(n::text, 4, '0'), $5,"
        " 'cvmbk-need-' || n, $5::timestamptz + interval '6 hours' FROM generate_series(1, $6) AS n"
        " RETURNING id",
        run_id,
        policy_id,
        ACCOUNT,
        REGION,
        NOW,
        count,
    )
    return [r["id"] for r in rows]


def fill_quota(sim: Simulator, room: int = 0) -> None:
    """Set the region's quota to what exists there now plus `room`."""
    live = [i for i in sim.state.images.values() if i.alive and i.region == REGION]
    sim.state.quota[REGION] = len(live) + room


async def record_image(
    pool: asyncpg.Pool,
    image_id: str,
    policy_id: int,
    instance_id: str,
    created_at: datetime,
    *,
    state: str = "NORMAL",
) -> None:
    """Record an image as ours, created at `created_at`."""
    await pool.execute(
        "INSERT INTO images (image_id, name, account, region, instance_id, policy_id, slot,"
        " state, created_at) VALUES ($1, $1, $2, $3, $4, $5, $6, $7, $6)",
        image_id,
        ACCOUNT,
        REGION,
        instance_id,
        policy_id,
        created_at,
        state,
    )


async def make_image(engine: EngineContext, instance_id: str) -> str:
    """An image made through CreateImage on the simulator; its id."""
    result = await engine.client(ACCOUNT).create_image(
        REGION, instance_id=instance_id, name=f"test-{instance_id}-{next(_names)}"
    )
    assert result.image_id is not None
    return result.image_id


async def history(
    engine: EngineContext, policy_id: int, instance_id: str, days: int, *, hours: int = 0
) -> list[str]:
    """`days` NORMAL images one day apart, the newest 1 day + `hours` old; ids oldest first."""
    ids = []
    for age in range(days, 0, -1):
        image_id = await make_image(engine, instance_id)
        created = NOW - timedelta(days=age, hours=hours)
        await record_image(engine.pool, image_id, policy_id, instance_id, created)
        ids.append(image_id)
    return ids


def alive(sim: Simulator, image_id: str) -> bool:
    """Whether the simulator still has the image."""
    return sim.state.images[image_id].alive


def deleted_ids(sim: Simulator) -> list[str]:
    """Ids deleted through DeleteImages, in order."""
    return [d.image_id for d in sim.state.deletions]


def foreign_alive(sim: Simulator) -> bool:
    """The pre-existing image that is not ours is still there."""
    return all(i.alive for i in sim.state.images.values() if not i.ours)


async def events(pool: asyncpg.Pool, kind: str) -> list[asyncpg.Record]:
    """Ledger rows of one kind, in order."""
    return await pool.fetch("SELECT * FROM events WHERE kind = $1 ORDER BY id", kind)
