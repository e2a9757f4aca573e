"""Scoped pauses end to end: a CAM denial in one region pauses only that (account, region)."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import replace
from datetime import UTC, datetime

import asyncpg
import pytest

from orchestrator import pauses, scheduler
from orchestrator.context import EngineContext
from orchestrator.daemon import EXIT_JOBS_FAILED, Engine, Signals
from orchestrator.db import policies as policy_rows
from orchestrator.pauses import ProbeTimings
from orchestrator.scheduler import Targets
from orchestrator.simulator.config import SimConfig
from orchestrator.simulator.fleet import generate_fleet
from orchestrator.simulator.runner import Simulator
from tests.fixtures.engine import insert_policy, job_states
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import TEST_REGION, make_sim_config

DENIED = TEST_REGION  # region A: CreateImage refused by a scoped CAM policy
ALLOWED = "ap-shanghai"  # region B: same account, same keys, allowed
CAM_DENIAL = "UnauthorizedOperation.PermissionDenied"
BALANCE = "InvalidAccount.InsufficientBalance"
# Probes far away: nothing but the test lifts a pause.
NO_PROBE = ProbeTimings(base=3600.0, cap=3600.0, retry=3600.0)


@pytest.fixture
def sim_config() -> SimConfig:
    """Three instances in each of two regions, one account."""
    return replace(
        make_sim_config(),
        instances=generate_fleet(6, regions=(DENIED, ALLOWED), seed=77, data_disks=1),
    )


def _ids(sim: Simulator, region: str) -> tuple[str, ...]:
    return tuple(s.instance_id for s in sim.config.instances if s.region == region)


async def _run(pool: asyncpg.Pool, name: str, ids: tuple[str, ...]) -> int:
    policy = await policy_rows.fetch_policy(pool, name)
    assert policy is not None
    slot = datetime.now(UTC).replace(second=0, microsecond=0)
    return (await scheduler.create_run(pool, policy, slot, Targets(ids, ()), "manual")).run_id


async def _states(pool: asyncpg.Pool, ids: Collection[str]) -> list[str]:
    states = await job_states(pool)
    return sorted(states[i][0] for i in ids if i in states)


async def _start(
    ctx: EngineContext, pool: asyncpg.Pool, sim: Simulator
) -> tuple[Engine, Signals, asyncio.Task[int]]:
    """A policy per region, and a daemon engine (one call in flight) whose scheduler runs them."""
    for name, region in (("in-a", DENIED), ("in-b", ALLOWED)):
        await insert_policy(pool, name, instance_ids=_ids(sim, region), region=region)
    one = replace(ctx, settings=replace(ctx.settings, max_in_flight=1))
    signals = Signals()
    engine = Engine(one, signals, probe=NO_PROBE)
    return engine, signals, asyncio.create_task(engine.run())


async def _stop(signals: Signals, running: asyncio.Task[int]) -> None:
    signals.stop.set()
    assert await asyncio.wait_for(running, 20) == 0


async def test_cam_denial_pauses_only_its_region(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """A CAM denial of CreateImage in region A pauses (account, A); region B's jobs succeed."""
    simulator.set_account_error(CAM_DENIAL, ("CreateImage",), region=DENIED)
    engine, signals, running = await _start(engine_ctx, pg_pool, simulator)
    denied, allowed = _ids(simulator, DENIED), _ids(simulator, ALLOWED)
    try:

        async def settled() -> bool:
            done = await _states(pg_pool, allowed) == ["succeeded"] * len(allowed)
            return done and bool(await pauses.listed(pg_pool))

        await wait_for(settled)
        assert engine.dispatcher.paused == {("default", DENIED)}
        # Exactly one CreateImage went to region A: the pause held the other jobs back.
        refused = [
            c for c in simulator.state.calls if c.action == "CreateImage" and c.region == DENIED
        ]
        assert [c.code for c in refused] == [CAM_DENIAL]
        assert await _states(pg_pool, denied) == ["failed"] + ["pending"] * (len(denied) - 1)
        assert await pauses.held_back(pg_pool) == len(denied) - 1
        made = [i for i in simulator.state.iter_ours() if i.alive]
        assert sorted(i.instance_id for i in made) == sorted(allowed)
    finally:
        await _stop(signals, running)


async def test_account_list_shows_the_regional_scope(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """`account list` data (pauses.listed) names the region, the action and the policy."""
    simulator.set_account_error(CAM_DENIAL, ("CreateImage",), region=DENIED)
    _, signals, running = await _start(engine_ctx, pg_pool, simulator)
    try:

        async def paused() -> bool:
            return bool(await pauses.listed(pg_pool))

        await wait_for(paused)
    finally:
        await _stop(signals, running)
    (entry,) = [p.to_json() for p in await pauses.listed(pg_pool)]
    assert {k: entry[k] for k in ("account", "scope", "scope_region", "code", "action")} == {
        "account": "default",
        "scope": "region",
        "scope_region": DENIED,
        "code": CAM_DENIAL,
        "action": "CreateImage",
    }
    assert (entry["region"], entry["policy"]) == (DENIED, "in-a")
    assert entry["instance_id"] in _ids(simulator, DENIED)
    assert "cvm:CreateImage" in entry["message"]
    (pause,) = await pauses.listed(pg_pool)
    assert pause.scope_label == f"region {DENIED}"
    assert pause.resume_command == f"cvm-backup account resume default --region {DENIED}"
    ledger = await pg_pool.fetch(
        "SELECT kind, region, details FROM events WHERE kind = 'account.paused'"
    )
    assert [(e["region"], e["details"]["scope"]) for e in ledger] == [(DENIED, "region")]


async def test_lifting_the_regional_pause_finishes_region_a(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """`account resume --region A` after the CAM fix: the held-back jobs of A complete."""
    simulator.set_account_error(CAM_DENIAL, ("CreateImage",), region=DENIED)
    engine, signals, running = await _start(engine_ctx, pg_pool, simulator)
    denied = _ids(simulator, DENIED)
    try:

        async def paused() -> bool:
            return bool(await pauses.listed(pg_pool))

        await wait_for(paused)
        simulator.set_account_error(None, ("CreateImage",), region=DENIED)
        # Lifting another region's pause (none) or the account-wide one (none) changes nothing.
        assert await pauses.resume(pg_pool, "default", "operator", scope_region=ALLOWED) is None
        assert await pauses.resume(pg_pool, "default", "operator") is None
        lifted = await pauses.resume(pg_pool, "default", "operator", scope_region=DENIED)
        assert lifted is not None
        assert lifted.scope_region == DENIED

        async def finished() -> bool:
            return await _states(pg_pool, denied) == ["failed"] + ["succeeded"] * (len(denied) - 1)

        await wait_for(finished)
        assert engine.dispatcher.paused == set()
    finally:
        await _stop(signals, running)


async def _drain(ctx: EngineContext, run_id: int) -> int:
    one = replace(ctx, settings=replace(ctx.settings, max_in_flight=1))
    engine = Engine(one, Signals(), once=True, run_id=run_id, probe=NO_PROBE)
    return await asyncio.wait_for(engine.run(), 30)


async def test_balance_error_pauses_the_whole_account(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """A balance error answered in region A pauses the account: region B's jobs wait too."""
    simulator.set_account_error(BALANCE, ("CreateImage",), region=DENIED)
    runs = {}
    for name, region in (("in-a", DENIED), ("in-b", ALLOWED)):
        ids = _ids(simulator, region)
        await insert_policy(pg_pool, name, instance_ids=ids, region=region)
        runs[region] = await _run(pg_pool, name, ids)
    assert await _drain(engine_ctx, runs[DENIED]) == EXIT_JOBS_FAILED
    (pause,) = await pauses.listed(pg_pool)
    assert (pause.scope_region, pause.to_json()["scope"]) == (None, "account")
    assert pause.resume_command == "cvm-backup account resume default"
    # Region B is not refused by the API, but the account is paused: not one call goes there.
    assert await _drain(engine_ctx, runs[ALLOWED]) == EXIT_JOBS_FAILED
    assert simulator.state.count_calls("CreateImage") == 1
    allowed = _ids(simulator, ALLOWED)
    assert await _states(pg_pool, allowed) == ["pending"] * len(allowed)
    assert await pauses.held_back(pg_pool) == len(simulator.config.instances) - 1
