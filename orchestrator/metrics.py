"""Prometheus metrics, in a registry of their own (never the global one), named `cvm_backup_*`.

| metric | type | labels | from |
|---|---|---|---|
| `cvm_backup_api_calls_total` | counter | account, action, region, code | every HTTP attempt |
| `cvm_backup_limiter_wait_seconds` | summary | account, action | `Limiters.snapshot()` |
| `cvm_backup_limiter_rate` | gauge | account, action | `Limiters.snapshot()` |
| `cvm_backup_jobs` | gauge | policy, state | jobs table, every state |
| `cvm_backup_images` | gauge | account, region, state | our live images |
| `cvm_backup_last_success_age_seconds` | gauge | policy | newest succeeded job |
| `cvm_backup_last_success_timestamp_seconds` | gauge | policy | newest succeeded job |
| `cvm_backup_image_quota` | gauge | account, region | DescribeImageQuota |
| `cvm_backup_database_up` | gauge | | 0 when the scrape could not read |

Each source is read where it is cheapest and freshest: API calls are counted by the CVM
clients after every HTTP attempt (`CvmClient.add_observer`, so retried and throttled attempts
count, with code "ok" for a success); limiter numbers are read at scrape time; the table
numbers are re-read from Postgres just before each scrape, so they include work other replicas
did; the quota is read through the API every few minutes by the health server (it changes
rarely and each read is an API call). A policy with no successful job yet has no age series.

When the database cannot be read its metrics are left out and `cvm_backup_database_up` is 0:
the scrape itself still succeeds, so the API and limiter metrics stay visible in an outage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from orchestrator import jobs, logs
from orchestrator.limiter import Limiters

if TYPE_CHECKING:
    from orchestrator.context import EngineContext
    from orchestrator.tencent.client import CvmClient

PREFIX = "cvm_backup_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JOB_STATES = (*jobs.LIVE_STATES, *jobs.TERMINAL_STATES)
# What a dropped, refused or timed-out database read raises; anything else is a bug to surface.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)

# A scrape must not hang on a stuck database: past this its numbers are left out of the scrape.
READ_TIMEOUT = 5.0

log = logs.get("metrics")

_JOBS = """
SELECT p.name AS policy, j.state, count(j.id) AS n
FROM policies p LEFT JOIN jobs j ON j.policy_id = p.id
GROUP BY p.name, j.state
"""

_IMAGES = """
SELECT account, region, state, count(*) AS n FROM images
WHERE deleted_at IS NULL GROUP BY account, region, state
"""

# Ages use the database clock, the same clock that wrote finished_at.
_LAST_SUCCESS = """
SELECT p.name AS policy, extract(epoch FROM max(j.finished_at)) AS at,
       extract(epoch FROM now() - max(j.finished_at)) AS age
FROM policies p JOIN jobs j ON j.policy_id = p.id AND j.state = 'succeeded'
GROUP BY p.name
"""

_REGIONS = "SELECT DISTINCT account, region FROM policies WHERE enabled ORDER BY 1, 2"

_PAUSED = "SELECT account, extract(epoch FROM paused_at) AS at FROM account_pauses"


@dataclass(frozen=True, slots=True)
class DatabaseSnapshot:
    """What the last refresh read from Postgres; `up` is False when it could not."""

    up: bool = False
    # Keyed by label values: (policy, state); (account, region, state); policy -> (at, age).
    jobs: Mapping[tuple[str, str], int] = field(default_factory=dict)
    images: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    last_success: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    paused: Mapping[str, float] = field(default_factory=dict)  # account -> paused since


def _job_counts(rows: Iterable[Any]) -> dict[tuple[str, str], int]:
    """Counts per (policy, state), every known state present (0 when none) for every policy."""
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        for state in JOB_STATES:
            counts.setdefault((row["policy"], state), 0)
        if row["state"] is not None:
            counts[(row["policy"], row["state"])] = int(row["n"])
    return counts


async def read_database(pool: asyncpg.Pool) -> DatabaseSnapshot:
    """One consistent read of the job, image and last-success numbers."""
    async with pool.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
        job_rows = await conn.fetch(_JOBS)
        image_rows = await conn.fetch(_IMAGES)
        success_rows = await conn.fetch(_LAST_SUCCESS)
        paused_rows = await conn.fetch(_PAUSED)
    return DatabaseSnapshot(
        up=True,
        jobs=_job_counts(job_rows),
        images={(r["account"], r["region"], r["state"]): int(r["n"]) for r in image_rows},
        last_success={r["policy"]: (float(r["at"]), float(r["age"])) for r in success_rows},
        paused={r["account"]: float(r["at"]) for r in paused_rows},
    )


def _gauge(name: str, doc: str, labels: Sequence[str], values: Mapping[Any, float]) -> Metric:
    family = GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))
    for key, value in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family


class _DatabaseCollector(Collector):
    """Yields the last database snapshot at scrape time."""

    def __init__(self) -> None:
        self.snapshot = DatabaseSnapshot()

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        up = {(): 1.0 if snap.up else 0.0}
        yield _gauge("database_up", "1 when the last scrape could read Postgres.", [], up)
        if snap.up:
            yield from self._tables(snap)

    def _tables(self, snap: DatabaseSnapshot) -> Iterator[Metric]:
        yield _gauge("jobs", "Jobs by policy and state.", ["policy", "state"], snap.jobs)
        yield _gauge(
            "images",
            "Our images not yet deleted, by account, region and image state.",
            ["account", "region", "state"],
            snap.images,
        )
        ats = {policy: at for policy, (at, _) in snap.last_success.items()}
        ages = {policy: age for policy, (_, age) in snap.last_success.items()}
        yield _gauge(
            "last_success_timestamp_seconds",
            "When the policy's newest successful job finished (Unix time).",
            ["policy"],
            ats,
        )
        yield _gauge(
            "last_success_age_seconds",
            "Seconds since the policy's newest successful job finished.",
            ["policy"],
            ages,
        )
        yield _gauge(
            "account_paused_since_timestamp_seconds",
            "When an account-wide error paused the account (Unix time); absent when not paused.",
            ["account"],
            snap.paused,
        )

    def describe(self) -> Iterable[Metric]:
        # Empty: the registry must not call collect() (and read a stale snapshot) at register.
        return ()


class _LimiterCollector(Collector):
    """Wait time and rate of every (account, action) limiter, read at scrape time."""

    def __init__(self) -> None:
        self.limiters: list[Limiters] = []

    def collect(self) -> Iterator[Metric]:
        wait = SummaryMetricFamily(
            PREFIX + "limiter_wait_seconds",
            "Time calls waited for the rate limiter, per account and action.",
            labels=["account", "action"],
        )
        rate = GaugeMetricFamily(
            PREFIX + "limiter_rate",
            "Calls per second the limiter grants now (below full rate after throttling).",
            labels=["account", "action"],
        )
        for limiters in self.limiters:
            for (account, action), stats in sorted(limiters.snapshot().items()):
                wait.add_metric([account, action], stats.calls, stats.total_wait)
                rate.add_metric([account, action], stats.rate)
        yield wait
        yield rate

    def describe(self) -> Iterable[Metric]:
        return ()


class Metrics:
    """The process's metrics; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.api_calls = Counter(
            PREFIX + "api_calls",
            "CVM API HTTP attempts by account, action, region and result code ('ok': success).",
            ["account", "action", "region", "code"],
            registry=self.registry,
        )
        self.quota = Gauge(
            PREFIX + "image_quota",
            "Custom-image quota per account and region, as DescribeImageQuota last said.",
            ["account", "region"],
            registry=self.registry,
        )
        self._database = _DatabaseCollector()
        self._limiters = _LimiterCollector()
        self.registry.register(self._database)
        self.registry.register(self._limiters)

    def api_call(self, account: str, action: str, region: str, code: str) -> None:
        """Count one API attempt (a `CvmClient` call observer)."""
        self.api_calls.labels(account, action, region, code).inc()

    def watch_client(self, client: CvmClient) -> None:
        """Count the client's calls and report its limiter."""
        client.add_observer(self.api_call)
        limiter = client.limiter
        if isinstance(limiter, Limiters) and all(
            limiter is not lim for lim in self._limiters.limiters
        ):
            self._limiters.limiters.append(limiter)

    def unwatch_client(self, client: CvmClient) -> None:
        """Stop counting the client's calls."""
        client.remove_observer(self.api_call)

    async def refresh(self, pool: asyncpg.Pool) -> None:
        """Re-read the database metrics; on failure they are dropped and database_up is 0."""
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                self._database.snapshot = await read_database(pool)
        except DATABASE_ERRORS as exc:
            log.warning("metrics.database_unavailable", error=f"{type(exc).__name__}: {exc}")
            self._database.snapshot = DatabaseSnapshot()

    async def refresh_quota(self, ctx: EngineContext) -> None:
        """DescribeImageQuota for every (account, region) of an enabled policy."""
        from orchestrator.tencent.errors import TencentError

        for row in await ctx.pool.fetch(_REGIONS):
            account, region = row["account"], row["region"]
            if account not in ctx.clients:
                continue
            try:
                quota = await ctx.client(account).describe_image_quota(region)
            except TencentError as exc:
                log.warning("metrics.quota_failed", account=account, region=region, code=exc.code)
                continue
            self.quota.labels(account, region).set(quota)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything."""
        return generate_latest(self.registry)
