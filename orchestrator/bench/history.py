"""A year of history beside none: what the daemon's recurring statements cost as history grows.

Two fresh databases hold the same fleet and live state (orchestrator.bench.history_data): one
with a year of daily backups of every instance behind it, one with only the rows the live
state needs. On each, in this process, the same work is timed:

- claim: the dispatcher's claim statement, a quarter of `max_in_flight` jobs at a time, over
  today's pending jobs until none is left (the last, empty claim included), three rounds;
- `status --json`: the rows `cvm-backup status --json` prints, and their JSON;
- a metrics scrape: the /metrics handler's database read and the exposition text;
- a retention sweep over every (policy, instance) with live images (it deletes nothing: the
  live images are exactly what retention keeps, as between two backups).

Each figure is the median of its repetitions, after one warm-up; the target is a history/empty
ratio of at most 1.5. Then a pruning pass (orchestrator.history, product batch size and pause)
removes the year's oldest days, and retention's decisions are compared before and after it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg

from orchestrator import history, jobs, rotation, status, sweep
from orchestrator.bench.harness import Env
from orchestrator.bench.history_data import ACCOUNT, REGION, Shape, counts, generate, shape
from orchestrator.config import MIN_HISTORY_DAYS, Settings
from orchestrator.context import EngineContext
from orchestrator.db.pool import create_pool_dsn
from orchestrator.limiter import Limiters
from orchestrator.metrics import Metrics
from orchestrator.simulator.config import SimConfig
from orchestrator.simulator.runner import run_simulator
from orchestrator.tencent.client import CvmClient
from orchestrator.tencent.credentials import Credentials, StaticCredentials

SECRET_ID = "AKIDbenchhistory000000000000000000"  # noqa: S105 - the simulator's own test key
SECRET_KEY = "bench-history-secret-key"  # noqa: S105
OWNER = "bench-history"
TARGET = 1.5
FIGURES = (
    ("claim", "claim (median)"),
    ("status", "status --json"),
    ("scrape", "metrics scrape"),
    ("sweep", "retention sweep"),
)
# Days left by the pruning pass: the year's oldest dozen go (8 more than a deleted image's
# row needs, so some images rows and their jobs go too).
PRUNE_KEEPS_ALL_BUT = 12


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


@dataclass(frozen=True, slots=True)
class Side:
    """One database under test: an engine context on it, and a metrics scraper started on it."""

    ctx: EngineContext
    metrics: Metrics


Work = Callable[[Side], Awaitable[Any]]


async def _alternating(
    sides: Mapping[str, Side], work: Work, repeat: int
) -> dict[str, list[float]]:
    """Seconds per call of `work` on each database, after a warm-up, taking turns.

    Turns alternate who goes first, so neither database gets the warmer caches or the quieter
    moments of a shared machine.
    """
    names = list(sides)
    taken: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        await work(sides[name])
    for turn in range(repeat):
        for name in names if turn % 2 == 0 else reversed(names):
            started = time.perf_counter()
            await work(sides[name])
            taken[name].append(time.perf_counter() - started)
    return taken


async def _claim_round(side: Side) -> list[float]:
    """Claim today's jobs a quarter of max_in_flight at a time until none is left, then give
    them back: seconds per claim, the last (empty) one included."""
    ctx = side.ctx
    batch = max(1, ctx.settings.max_in_flight // 4)
    taken: list[float] = []
    held: list[int] = []
    while True:
        started = time.perf_counter()
        got = await jobs.claim(ctx.pool, OWNER, batch, 60.0, accounts=[ACCOUNT])
        taken.append(time.perf_counter() - started)
        if not got:
            break
        held.extend(j.id for j in got)
    await jobs.release(ctx.pool, OWNER, held)
    return taken


async def _claims(sides: Mapping[str, Side], rounds: int) -> dict[str, Any]:
    taken: dict[str, list[float]] = {name: [] for name in sides}
    for turn in range(rounds):
        for name in sides if turn % 2 == 0 else reversed(list(sides)):
            taken[name] += await _claim_round(sides[name])
    found = {}
    for name, samples in taken.items():
        ordered = sorted(samples)
        found[name] = {
            "median_ms": _median_ms(samples),
            "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 2),
            "claims": len(samples),
        }
    return found


async def _status(side: Side) -> int:
    """What `cvm-backup status --json` does once connected: the rows, as JSON."""
    rows = await status.fetch_rows(side.ctx.pool)
    json.dumps(rows)
    return len(rows)


async def _scrape(side: Side) -> int:
    """What the /metrics handler does against the database: refresh, then render.

    Each side's `Metrics` was started like the daemon's, so a scrape reads what one reads
    between two others (the jobs finished since the previous scrape, say).
    """
    await side.metrics.refresh(side.ctx.pool)
    return len(side.metrics.render())


async def _sweep(side: Side) -> sweep.SweepResult:
    return await sweep.sweep(side.ctx, {ACCOUNT})


async def _measure(sides: Mapping[str, Side], quick: bool) -> dict[str, Any]:
    """Every figure on every database: {database: {figure: {...}}}."""
    repeat = 2 if quick else 5
    claims = await _claims(sides, 2 if quick else 4)
    timed = {
        "status": await _alternating(sides, _status, repeat),
        "scrape": await _alternating(sides, _scrape, repeat),
        "sweep": await _alternating(sides, _sweep, repeat),
    }
    found: dict[str, Any] = {}
    for name, side in sides.items():
        swept = await _sweep(side)
        found[name] = {
            "claim": claims[name],
            "status": {"median_ms": _median_ms(timed["status"][name]), "rows": await _status(side)},
            "scrape": {
                "median_ms": _median_ms(timed["scrape"][name]),
                "bytes": await _scrape(side),
            },
            "sweep": {
                "median_ms": _median_ms(timed["sweep"][name]),
                "pairs": swept.pairs,
                "deleted": len(swept.deleted),
            },
        }
    return found


async def _decisions(pool: asyncpg.Pool) -> dict[tuple[int, str], list[tuple[str, bool]]]:
    """What retention decides now for every live (policy, instance): (image, keep) pairs."""
    rows = await pool.fetch(rotation.REGION_IMAGES, ACCOUNT, REGION)
    found = {}
    for group in rotation.per_instance(rows):
        images = [rotation.LiveImage.from_record(r) for r in group]
        decided = rotation.decide_or_skip(group[0], images) or []
        key = (group[0]["policy_id"], group[0]["instance_id"])
        found[key] = sorted((d.image_id, d.keep) for d in decided)
    return found


async def _sizes(pool: asyncpg.Pool) -> dict[str, Any]:
    """The database's size and each table's, indexes included, in bytes."""
    total = await pool.fetchval("SELECT pg_database_size(current_database())")
    tables = {
        t: int(await pool.fetchval("SELECT pg_total_relation_size($1::regclass)", t))
        for t in ("jobs", "events", "images", "runs")
    }
    return {"database_bytes": int(total), "tables_bytes": tables}


@asynccontextmanager
async def _prepared(
    env: Env, sh: Shape, endpoint: str, *, full: bool
) -> AsyncIterator[tuple[Side, dict[str, Any]]]:
    """A database with the fleet's rows, vacuumed as autovacuum would, and a context on it."""
    async with env.database.fresh() as dsn:
        pool = await create_pool_dsn(dsn, min_size=1, max_size=4)
        try:
            async with pool.acquire() as conn:
                made = await generate(conn, sh, history=full)
                started = time.monotonic()
                await conn.execute("VACUUM (ANALYZE)")
                made["vacuum_seconds"] = round(time.monotonic() - started, 1)
            settings = Settings(endpoint=endpoint)
            client = CvmClient(
                credentials=StaticCredentials(Credentials(SECRET_ID, SECRET_KEY)),
                endpoint=endpoint,
                limiter=Limiters.from_settings(settings),
                account=ACCOUNT,
            )
            async with client:
                ctx = EngineContext(pool, {ACCOUNT: client}, settings, OWNER)
                metrics = Metrics()
                await metrics.start(pool)
                yield Side(ctx, metrics), {"generated": made, **await _sizes(pool)}
        finally:
            await pool.close()


async def _prune(pool: asyncpg.Pool, sh: Shape) -> dict[str, Any]:
    """A pruning pass that removes the oldest days, then one with nothing left to prune."""
    before = await _decisions(pool)
    days = max(sh.days - PRUNE_KEEPS_ALL_BUT, MIN_HISTORY_DAYS)
    started = time.monotonic()
    result = await history.prune(pool, days)
    took = time.monotonic() - started
    idle = await history.prune(pool, days)
    return {
        "history_days": days,
        "deleted": result.deleted,
        "batches": result.batches,
        "seconds": round(took, 1),
        "batch_ms_median": _median_ms(result.batch_seconds),
        "batch_ms_max": round(max(result.batch_seconds, default=0.0) * 1000, 1),
        # At steady state every pass is like this one: what it costs the database.
        "idle_pass_batches": idle.batches,
        "idle_pass_work_ms": round(sum(idle.batch_seconds) * 1000, 1),
        "idle_pass_deleted": idle.total,
        "rows_left": await counts(pool),
        "decisions_unchanged": before == await _decisions(pool),
    }


def _ratios(empty: Mapping[str, Any], full: Mapping[str, Any]) -> dict[str, float | None]:
    found: dict[str, float | None] = {}
    for key, _ in FIGURES:
        base, value = empty[key]["median_ms"], full[key]["median_ms"]
        found[key] = round(value / base, 2) if base else None
    return found


async def history_at_scale(env: Env) -> dict[str, Any]:
    """A year of daily backups of the fleet against the same fleet with no history."""
    options = env.options
    sh = shape(options.history_instances, options.history_span)
    sim_config = SimConfig(credentials={SECRET_ID: SECRET_KEY})
    async with (
        run_simulator(sim_config) as sim,
        _prepared(env, sh, sim.url, full=False) as (empty_side, empty),
        _prepared(env, sh, sim.url, full=True) as (full_side, full),
    ):
        figures = await _measure({"empty": empty_side, "history": full_side}, options.quick)
        empty["figures"], full["figures"] = figures["empty"], figures["history"]
        full["prune"] = await _prune(full_side.ctx.pool, sh)
    ratios = _ratios(empty["figures"], full["figures"])
    return {
        "instances": sh.instances,
        "days": sh.days,
        "policies": sh.policies,
        "live_images_per_instance": len(sh.kept),
        "empty": empty,
        "history": full,
        "ratios": ratios,
        "targets": [_judged(label, ratios[key]) for key, label in FIGURES],
    }


def _judged(name: str, measured: float | None) -> dict[str, Any]:
    met = None if measured is None else measured <= TARGET
    return {"name": name, "target": f"<= {TARGET}", "measured": measured, "met": met}


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def table(result: Mapping[str, Any]) -> str:
    """The figures side by side, with the sizes and the pruning pass."""
    if "error" in result:
        return f"history: error: {result['error']}"
    empty, full = result["empty"], result["history"]
    rows: list[tuple[str, ...]] = [
        ("figure", "empty history", f"{result['days']} days of history", "ratio", "target")
    ]
    for (key, label), judged in zip(FIGURES, result["targets"], strict=True):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[judged["met"]]
        rows.append(
            (
                label,
                f"{empty['figures'][key]['median_ms']} ms",
                f"{full['figures'][key]['median_ms']} ms",
                f"{judged['measured']}x",
                f"<= {TARGET}x {verdict}",
            )
        )
    rows.append(
        ("claim (p95)", *(f"{d['figures']['claim']['p95_ms']} ms" for d in (empty, full)), "", "")
    )
    sizes = (_size(d["database_bytes"]) for d in (empty, full))
    rows.append(("database size", *sizes, "", ""))
    for name in ("jobs", "events", "images"):
        rows.append(
            (
                f"  {name} rows",
                *(f"{d['generated']['rows'][name]:,}" for d in (empty, full)),
                "",
                "",
            )
        )
    prune = full["prune"]
    removed = ", ".join(f"{n:,} {t}" for t, n in prune["deleted"].items())
    note = (
        f"{result['instances']:,} instances in {result['policies']} policies, backed up daily; "
        f"{result['live_images_per_instance']} live images each.\n"
        f"pruning to history_days={prune['history_days']}: {removed} in {prune['batches']} "
        f"batches, {prune['seconds']} s (a batch {prune['batch_ms_median']} ms, at most "
        f"{prune['batch_ms_max']} ms; {history.BATCH_PAUSE} s pause between); a pass with "
        f"nothing to prune {prune['idle_pass_batches']} batches, "
        f"{prune['idle_pass_work_ms']} ms of work; retention decisions unchanged: "
        f"{prune['decisions_unchanged']}"
    )
    return _cells(rows) + "\n" + note


def _cells(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
