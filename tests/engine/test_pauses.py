"""Account pauses: durable in Postgres, skipped by the claim, probed and resumed by themselves."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime

import asyncpg

from orchestrator import jobs, pauses, scheduler
from orchestrator.context import EngineContext
from orchestrator.daemon import EXIT_JOBS_FAILED, Engine, Signals
from orchestrator.db import policies as policy_rows
from orchestrator.pauses import ProbeTimings
from orchestrator.prober import Prober
from orchestrator.scheduler import Targets
from orchestrator.simulator.config import Faults
from orchestrator.simulator.runner import Simulator
from orchestrator.tencent.errors import TencentError
from tests.fixtures.engine import insert_policy, job_states
from tests.fixtures.logs import LogCapture
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import TEST_REGION

BALANCE = "InvalidAccount.InsufficientBalance"
# Probes far away: the engine under test must not probe unless the test says so.
NO_PROBE = ProbeTimings(base=3600.0, cap=3600.0, retry=3600.0)
FAST_PROBE = ProbeTimings(base=0.2, cap=0.8, retry=0.1)


async def _run(pool: asyncpg.Pool, name: str, ids: tuple[str, ...]) -> int:
    policy = await policy_rows.fetch_policy(pool, name)
    assert policy is not None
    slot = datetime.now(UTC).replace(second=0, microsecond=0)
    return (await scheduler.create_run(pool, policy, slot, Targets(ids, ()), "manual")).run_id


async def _drain(ctx: EngineContext, run_id: int, probe: ProbeTimings) -> int:
    engine = Engine(ctx, Signals(), once=True, run_id=run_id, probe=probe)
    return await asyncio.wait_for(engine.run(), 30)


async def _pause_row(pool: asyncpg.Pool) -> asyncpg.Record | None:
    return await pool.fetchrow(
        "SELECT *, extract(epoch FROM probe_at - updated_at) AS delay FROM account_pauses"
    )


async def _paused_run(
    ctx: EngineContext, pool: asyncpg.Pool, sim: Simulator, name: str
) -> tuple[int, tuple[str, ...]]:
    """A run of every instance whose first CreateImage answers InsufficientBalance."""
    ids = tuple(i.instance_id for i in sim.config.instances)
    await insert_policy(pool, name, instance_ids=ids)
    run_id = await _run(pool, name, ids)
    sim.set_account_error(BALANCE)
    one = replace(ctx, settings=replace(ctx.settings, max_in_flight=1))
    assert await _drain(one, run_id, NO_PROBE) == EXIT_JOBS_FAILED
    return run_id, ids


async def test_pause_is_durable_and_survives_a_new_engine(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """The account error is a row; a fresh engine neither claims nor calls for that account."""
    run_id, ids = await _paused_run(engine_ctx, pg_pool, simulator, "bal")
    row = await _pause_row(pg_pool)
    assert row is not None
    assert (row["account"], row["code"], row["failed_probes"]) == ("default", BALANCE, 0)
    assert row["region"] == TEST_REGION
    assert row["instance_id"] in ids
    assert simulator.state.count_calls("CreateImage") == 1
    # A restart: a new engine (new dispatcher, empty memory) leaves the account alone.
    assert await _drain(engine_ctx, run_id, NO_PROBE) == EXIT_JOBS_FAILED
    assert simulator.state.count_calls("CreateImage") == 1
    states = [s for s, _, _ in (await job_states(pg_pool)).values()]
    assert sorted(states) == ["failed"] + ["pending"] * (len(ids) - 1)
    assert await pauses.held_back(pg_pool, run_id) == len(ids) - 1
    ledger = await pg_pool.fetch("SELECT kind, reason FROM events WHERE kind LIKE 'account.%'")
    assert [(e["kind"], e["reason"]) for e in ledger] == [("account.paused", BALANCE)]


async def test_claim_next_due_and_live_count_skip_only_the_paused_account(
    pg_pool: asyncpg.Pool,
) -> None:
    """Jobs of a paused account are not claimed, not awaited; another account's are."""
    ids = ("ins-pause001", "ins-pause002")
    await insert_policy(pg_pool, "two", instance_ids=ids)
    run_id = await _run(pg_pool, "two", ids)
    await pg_pool.execute("UPDATE jobs SET account = 'other' WHERE instance_id = $1", ids[1])
    refused = TencentError("AuthFailure.SecretIdNotFound", "no such id", "req-9")
    await pauses.pause(
        pg_pool, "default", refused, region=TEST_REGION, instance_id=ids[0], first_probe=60
    )
    assert await jobs.live_count(pg_pool, run_id=run_id) == 1
    assert await jobs.next_due(pg_pool, ["default"]) is None
    assert await jobs.next_due(pg_pool) is not None
    claimed = await jobs.claim(pg_pool, "me", 5, 30)
    assert [(j.account, j.instance_id) for j in claimed] == [("other", ids[1])]
    assert await pauses.resume(pg_pool, "default", "operator") is not None
    assert [j.instance_id for j in await jobs.claim(pg_pool, "me", 5, 30)] == [ids[0]]


async def test_a_refused_probe_backs_off_and_a_lost_one_retries_soon(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """An account-wide answer doubles the wait up to the cap; no answer retries uncounted."""
    await _paused_run(engine_ctx, pg_pool, simulator, "back")
    prober = Prober(engine_ctx, timings=ProbeTimings(base=10.0, cap=35.0, retry=3.0))
    delays = []
    for _ in range(3):
        await pg_pool.execute("UPDATE account_pauses SET probe_at = paused_at")
        await prober.round()
        row = await _pause_row(pg_pool)
        assert row is not None
        delays.append((row["failed_probes"], float(row["delay"])))
    assert delays == [(1, 20.0), (2, 35.0), (3, 35.0)]
    simulator.set_account_error(None)
    simulator.set_faults(Faults(internal_error_rate=1.0), action="CreateImage")
    await pg_pool.execute("UPDATE account_pauses SET probe_at = paused_at")
    await prober.round()
    row = await _pause_row(pg_pool)
    assert row is not None
    assert (row["failed_probes"], float(row["delay"])) == (3, 3.0)
    assert prober.paused == {"default"}


async def test_a_due_probe_resumes_the_account_and_its_jobs_complete(
    engine_ctx: EngineContext,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    captured_logs: LogCapture,
) -> None:
    """Fixed account, probe due: `run --once` lifts the pause first and drains every job."""
    run_id, ids = await _paused_run(engine_ctx, pg_pool, simulator, "fixed")
    simulator.set_account_error(None)
    await pg_pool.execute("UPDATE account_pauses SET probe_at = paused_at")
    # The failed job keeps the run's exit code at 1; every other job now succeeds.
    assert await _drain(engine_ctx, run_id, NO_PROBE) == EXIT_JOBS_FAILED
    assert await _pause_row(pg_pool) is None
    states = [s for s, _, _ in (await job_states(pg_pool)).values()]
    assert sorted(states) == ["failed"] + ["succeeded"] * (len(ids) - 1)
    resumed = [line for line in captured_logs.lines if line["event"] == "account.resumed"]
    assert [(r["account"], r["by"], r["paused_code"]) for r in resumed] == [
        ("default", "probe", BALANCE)
    ]
    ledger = await pg_pool.fetch("SELECT kind, reason FROM events WHERE kind LIKE 'account.%'")
    assert [(e["kind"], e["reason"]) for e in ledger][-1] == ("account.resumed", "probe")


async def test_the_daemon_probes_backs_off_and_resumes_by_itself(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """A running daemon pauses, probes until the account is fixed, then finishes the run."""
    ids = tuple(i.instance_id for i in simulator.config.instances)
    await insert_policy(pg_pool, "auto", instance_ids=ids)
    simulator.set_account_error(BALANCE)
    ctx = replace(engine_ctx, settings=replace(engine_ctx.settings, max_in_flight=1))
    signals = Signals()
    running = asyncio.create_task(Engine(ctx, signals, probe=FAST_PROBE).run())
    try:
        await _run(pg_pool, "auto", ids)

        async def refused_twice() -> bool:
            row = await _pause_row(pg_pool)
            return row is not None and row["failed_probes"] >= 2

        await wait_for(refused_twice)
        simulator.set_account_error(None)

        async def finished() -> bool:
            # At least: the scheduler may also run today's slot meanwhile, and then the
            # instance whose job failed on the pause succeeds there too.
            states = [s for s, _, _ in (await job_states(pg_pool)).values()]
            return states.count("succeeded") >= len(ids) - 1

        await wait_for(finished)
        assert await _pause_row(pg_pool) is None
    finally:
        signals.stop.set()
        assert await asyncio.wait_for(running, 20) == 0


async def test_a_pause_lifted_elsewhere_reaches_the_dispatcher(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """`account resume` in another process: the running daemon's next round claims the jobs."""
    ids = tuple(i.instance_id for i in simulator.config.instances[:2])
    await insert_policy(pg_pool, "ext", instance_ids=ids)
    await _run(pg_pool, "ext", ids)
    refused = TencentError("UnauthorizedOperation.PermissionDenied", "CAM says no", "req-2")
    await pauses.pause(
        pg_pool, "default", refused, region=TEST_REGION, instance_id=ids[0], first_probe=3600
    )
    signals = Signals()
    engine = Engine(engine_ctx, signals, probe=NO_PROBE)
    running = asyncio.create_task(engine.run())
    try:

        async def seen() -> bool:
            # A CAM denial pauses only the region it came from.
            return engine.dispatcher.paused == {("default", TEST_REGION)}

        await wait_for(seen)
        assert simulator.state.count_calls("CreateImage") == 0
        assert await pauses.resume_all(pg_pool, "default", "operator") != []

        async def finished() -> bool:
            states = [s for s, _, _ in (await job_states(pg_pool)).values()]
            return states == ["succeeded"] * len(ids)

        await wait_for(finished)
        assert engine.dispatcher.paused == set()
    finally:
        signals.stop.set()
        assert await asyncio.wait_for(running, 20) == 0


def test_probe_backoff_doubles_and_is_capped() -> None:
    """1 min doubling to 1 h by default, and no overflow after endless refusals."""
    timings = ProbeTimings()
    assert [timings.after_failures(n) for n in (0, 1, 2, 6, 7, 10_000)] == [
        60.0,
        120.0,
        240.0,
        3600.0,
        3600.0,
        3600.0,
    ]


async def test_only_the_replica_driving_the_account_probes_it(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """A replica without the account's lease neither probes nor lifts its pause."""
    refused = TencentError("AuthFailure.SecretIdNotFound", "no such id", "req-3")
    instance = simulator.config.instances[0].instance_id
    await pauses.pause(
        pg_pool, "default", refused, region=TEST_REGION, instance_id=instance, first_probe=0
    )
    bystander = Prober(engine_ctx, held=frozenset)
    await bystander.round()
    assert simulator.state.count_calls("CreateImage") == 0
    assert bystander.paused == frozenset()
    holder = Prober(engine_ctx, held=lambda: frozenset({"default"}))
    await holder.round()
    assert simulator.state.count_calls("CreateImage") == 1
    assert await _pause_row(pg_pool) is None


async def _record_pause(pool: asyncpg.Pool, prober: Prober) -> None:
    """A pause recorded by this replica's dispatcher: the row first, then `noted`."""
    await pauses.pause(
        pool,
        "default",
        TencentError(BALANCE, "no money", "req-4"),
        region=TEST_REGION,
        instance_id="ins-1",
        first_probe=3600,
    )
    prober.noted(("default", None))


async def test_a_pause_lifted_before_any_round_saw_it_reaches_the_dispatcher(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool
) -> None:
    """Paused by this replica and resumed before the next round: that round reports the lift."""
    changes: list[tuple[str, bool, str | None]] = []
    prober = Prober(engine_ctx, timings=NO_PROBE, on_change=lambda *c: changes.append(c))
    await _record_pause(pg_pool, prober)
    assert await pauses.resume(pg_pool, "default", "operator") is not None
    await prober.round()
    assert changes == [("default", False, None)]
    assert prober.paused == frozenset()


async def test_a_pause_noted_while_a_round_reads_is_not_taken_for_a_lift(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool
) -> None:
    """A read that began before the pause was recorded keeps it; the next round sees its row."""
    changes: list[tuple[str, bool, str | None]] = []
    prober = Prober(engine_ctx, timings=NO_PROBE, on_change=lambda *c: changes.append(c))
    read_at = time.monotonic()
    before = {p.scope for p in await pauses.listed(pg_pool)}
    await _record_pause(pg_pool, prober)  # lands after that read: missing from `before`
    prober._sync(before, {"default"}, read_at)
    assert changes == []
    assert prober.paused == {"default"}
    await prober.round()
    assert changes == []
    assert prober.paused == {"default"}
