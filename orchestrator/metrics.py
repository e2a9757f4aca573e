"""Prometheus metrics, in a registry of their own (never the global one), named `cvm_backup_*`.

| metric | type | labels | from |
|---|---|---|---|
| `cvm_backup_build_info` | gauge | version | always 1 |
| `cvm_backup_api_calls_total` | counter | account, action, region, code | every HTTP attempt |
| `cvm_backup_limiter_wait_seconds` | summary | account, action | `Limiters.snapshot()` |
| `cvm_backup_limiter_rate`, `_full_rate` | gauge | account, action | `Limiters.snapshot()` |
| `cvm_backup_limiter_throttles_total` | counter | account, action | `Limiters.snapshot()` |
| `cvm_backup_account_lease_held` | gauge | account | 1 when this process drives it |
| `cvm_backup_image_quota` | gauge | account, region | DescribeImageQuota |
| `cvm_backup_database_up` | gauge | | 0 when the scrape could not read |
| `cvm_backup_jobs` | gauge | policy, state | live jobs (never the history) |
| `cvm_backup_jobs_finished_total` | counter | policy, outcome, reason | jobs finished since start |
| `cvm_backup_images` | gauge | account, region, state | our live images |
| `cvm_backup_last_success_timestamp_seconds` | gauge | policy | newest good image, any instance |
| `cvm_backup_last_success_age_seconds` | gauge | policy | the same, as an age |
| `cvm_backup_instance_last_success_timestamp_seconds` | gauge | policy, instance_id | per target |
| `cvm_backup_copy_last_success_timestamp_seconds` | gauge | policy, instance_id, region | copies |
| `cvm_backup_policy_rpo_seconds` | gauge | policy | `orchestrator.rpo` |
| `cvm_backup_policy_instances_overdue` | gauge | policy | targets older than the RPO |
| `cvm_backup_account_paused_since_timestamp_seconds` | gauge | account | account_pauses |

plus prometheus-client's process, platform and GC collectors (`process_*`, `python_*`).

Scrape cost does not grow with history: every query reads live rows (partial indexes over live
jobs and live images), one run per policy (its newest, through the (policy_id, slot) key), or the
jobs finished since the previous scrape (a range of `jobs_finished_idx`). Finished jobs are a
counter kept in this process: each scrape adds the jobs that finished since the last one,
re-reading a few minutes back (`FINISHED_OVERLAP`) because `finished_at` is a transaction's
start time and a long transaction commits rows older than the previous scrape; ids already
counted are remembered for that long. The counter starts at 0 when the process starts; when a
lease moves, a job that finished within that overlap may be counted by both replicas.

Database numbers are served only for the accounts whose lease this process holds (`held`), so N
replicas do not repeat them N times; the process-level metrics (API calls, limiter, leases,
build info) come from every replica and carry Prometheus' own `instance` target label. Label
values are bounded: accounts and regions by the config and policies, policies by the table,
`instance_id` by the fleet the policies target (the newest run's jobs), states, outcomes and
reasons by fixed lists (others count as "other"), and API codes by `MAX_CODES`.

When the database cannot be read its gauges are left out and `cvm_backup_database_up` is 0: the
scrape itself still succeeds, so the API and limiter metrics stay visible in an outage.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from orchestrator import __version__, jobs, logs, rpo
from orchestrator.db import policies as policy_rows
from orchestrator.limiter import Limiters
from orchestrator.policies import Policy

if TYPE_CHECKING:
    from orchestrator.context import EngineContext
    from orchestrator.tencent.client import CvmClient

PREFIX = "cvm_backup_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LIVE_STATES = jobs.LIVE_STATES
# The reasons the engine writes with each terminal state; a row with another (written by hand,
# or by a newer version) counts as "other", so the label stays bounded.
OUTCOME_REASONS: Mapping[str, tuple[str, ...]] = {
    "succeeded": ("image_ready",),
    "failed": (
        "permanent_error",
        "retries_exhausted",
        "quota_exhausted",
        "quota_full",
        "account_error",
        "name_taken",
        "image_failed",
    ),
    "expired": ("window_closed",),
    "skipped": ("instance_gone", "policy_disabled"),
}
OTHER = "other"
# Distinct API answer codes per process: Tencent has about 50 per action, a misbehaving
# endpoint could invent any number; past this they count as "other".
MAX_CODES = 200
_CODE_RE = re.compile(r"[A-Za-z0-9_.]{1,80}")
# How far back each scrape re-reads finished jobs (see the module docstring), in seconds.
FINISHED_OVERLAP = 300.0
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

Held = Callable[[], Collection[str]]

log = logs.get("metrics")

# `$1::text[]` NULL: every account (a process without leases drives them all).
_ACCOUNT = "($1::text[] IS NULL OR {column} = ANY($1::text[]))"

_POLICIES = f"SELECT name FROM policies WHERE {_ACCOUNT.format(column='account')} ORDER BY name"

# Two arms so each matches a partial index (jobs_claim_idx, jobs_waiting_image_idx): the count
# costs the live jobs, however many finished ones the table holds.
_LIVE_JOBS = f"""
SELECT p.name AS policy, j.state, count(*) AS n
FROM (SELECT policy_id, state FROM jobs WHERE state IN ('pending', 'claimed', 'creating')
      UNION ALL
      SELECT policy_id, state FROM jobs WHERE state = 'waiting_image') AS j
JOIN policies p ON p.id = j.policy_id
WHERE {_ACCOUNT.format(column="p.account")}
GROUP BY p.name, j.state
"""

_IMAGES = f"""
SELECT account, region, state, count(*) AS n FROM images
WHERE deleted_at IS NULL AND {_ACCOUNT.format(column="account")}
GROUP BY account, region, state
"""

# The newest good image of any instance, per policy: live images only (images_region_live_idx
# and images_policy_instance_idx are partial on deleted_at IS NULL).
_LAST_GOOD = f"""
SELECT p.name AS policy, extract(epoch FROM max(i.created_at)) AS at
FROM images i JOIN policies p ON p.id = i.policy_id
WHERE i.deleted_at IS NULL AND i.state = 'NORMAL' AND i.source_image_id IS NULL
  AND {_ACCOUNT.format(column="p.account")}
GROUP BY p.name
"""

# Each enabled policy's targets are the jobs of its newest run (an instance that left the policy
# stops being reported; a skipped one, gone or disabled, is not a target). For each: the newest
# good image, and when there is none, whether its first job ever has ended or run out of window
# (before that it is not late, merely new).
_LATEST_RUNS = f"""
WITH latest AS (
    SELECT p.id, p.name, p.copies, r.id AS run_id
    FROM policies p
    CROSS JOIN LATERAL (SELECT id FROM runs WHERE runs.policy_id = p.id
                        ORDER BY slot DESC LIMIT 1) AS r
    WHERE p.enabled AND {_ACCOUNT.format(column="p.account")}
)"""

# Backups only: a copy's freshness is its own series (_COPY_TARGETS).
_TARGETS = f"""{_LATEST_RUNS}
SELECT l.name AS policy, j.instance_id, extract(epoch FROM g.at) AS good_at, f.ended
FROM latest l
JOIN jobs j ON j.run_id = l.run_id AND j.kind = 'backup' AND j.state <> 'skipped'
LEFT JOIN LATERAL (
    SELECT max(i.created_at) AS at FROM images i
    WHERE i.policy_id = l.id AND i.instance_id = j.instance_id
      AND i.deleted_at IS NULL AND i.state = 'NORMAL' AND i.source_image_id IS NULL
) AS g ON true
LEFT JOIN LATERAL (
    SELECT (first.finished_at IS NOT NULL OR first.deadline <= now()) AS ended
    FROM jobs first
    WHERE first.policy_id = l.id AND first.instance_id = j.instance_id AND first.kind = 'backup'
      AND g.at IS NULL
    ORDER BY first.slot LIMIT 1
) AS f ON true
"""

# The same for each copy destination of each target: the newest good copy there, else whether
# the instance's first copy job to that region has ended (before that it is new, not late).
_COPY_TARGETS = f"""{_LATEST_RUNS}
SELECT l.name AS policy, j.instance_id, d.region, extract(epoch FROM g.at) AS good_at, f.ended
FROM latest l
JOIN jobs j ON j.run_id = l.run_id AND j.kind = 'backup' AND j.state <> 'skipped'
CROSS JOIN LATERAL jsonb_to_recordset(l.copies) AS d(region text)
LEFT JOIN LATERAL (
    SELECT max(i.created_at) AS at FROM images i
    WHERE i.policy_id = l.id AND i.instance_id = j.instance_id AND i.region = d.region
      AND i.deleted_at IS NULL AND i.state = 'NORMAL' AND i.source_image_id IS NOT NULL
) AS g ON true
LEFT JOIN LATERAL (
    SELECT (first.finished_at IS NOT NULL OR first.deadline <= now()) AS ended
    FROM jobs first
    WHERE first.policy_id = l.id AND first.instance_id = j.instance_id
      AND first.region = d.region AND first.kind = 'copy' AND g.at IS NULL
    ORDER BY first.slot LIMIT 1
) AS f ON true
WHERE d.region IS NOT NULL
"""

_PAUSED = f"""
SELECT account, extract(epoch FROM min(paused_at)) AS at FROM account_pauses
WHERE {_ACCOUNT.format(column="account")} GROUP BY account
"""

# A range of jobs_finished_idx: the jobs finished since the previous scrape (and the overlap).
_FINISHED = f"""
SELECT j.id, p.name AS policy, j.state, j.reason, extract(epoch FROM j.finished_at) AS at
FROM jobs j JOIN policies p ON p.id = j.policy_id
WHERE j.finished_at > to_timestamp($2::float8) AND {_ACCOUNT.format(column="j.account")}
"""

# Where to read the quota: enabled policies' regions, except where a pause stops every call to
# the API (orchestrator.pauses: the whole account, or one region after a CAM denial).
_REGIONS = f"""
SELECT DISTINCT p.account, p.region FROM policies p
WHERE p.enabled AND {_ACCOUNT.format(column="p.account")}
  AND NOT EXISTS (SELECT 1 FROM account_pauses ap WHERE ap.account = p.account
                  AND (ap.scope_region IS NULL OR ap.scope_region = p.region))
ORDER BY 1, 2
"""


@dataclass(frozen=True, slots=True)
class Finished:
    """One job that reached a terminal state."""

    id: int
    policy: str
    outcome: str
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class DatabaseSnapshot:
    """What the last refresh read from Postgres; `up` is False when it could not."""

    up: bool = False
    now: float = 0.0  # the database clock, Unix time
    policies: tuple[str, ...] = ()
    # Keyed by label values: (policy, state); (account, region, state); policy -> Unix time.
    jobs: Mapping[tuple[str, str], int] = field(default_factory=dict)
    images: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    last_good: Mapping[str, float] = field(default_factory=dict)
    # (policy, instance_id) -> Unix time of its newest good image; 0: none, and it is late.
    instances: Mapping[tuple[str, str], float] = field(default_factory=dict)
    # (policy, instance_id, destination region) -> the same for its newest good copy there.
    copies: Mapping[tuple[str, str, str], float] = field(default_factory=dict)
    rpo: Mapping[str, float] = field(default_factory=dict)  # policy -> seconds
    overdue: Mapping[str, int] = field(default_factory=dict)  # policy -> instances
    paused: Mapping[str, float] = field(default_factory=dict)  # account -> paused since
    finished: tuple[Finished, ...] = ()


def _live_counts(policies: Iterable[str], rows: Iterable[Any]) -> dict[tuple[str, str], int]:
    """Counts per (policy, live state), every live state present (0 when none) for every policy."""
    counts = {(policy, state): 0 for policy in policies for state in LIVE_STATES}
    for row in rows:
        counts[(row["policy"], row["state"])] = int(row["n"])
    return counts


def _instance_freshness(
    rows: Iterable[Any], keys: Sequence[str] = ("policy", "instance_id")
) -> dict[Any, float]:
    """(policy, instance[, region]) -> newest good image; none is 0 once it is late."""
    found: dict[Any, float] = {}
    for row in rows:
        key = tuple(row[k] for k in keys)
        if row["good_at"] is not None:
            found[key] = float(row["good_at"])
        elif row["ended"]:
            found[key] = 0.0
    return found


def _rpos(
    policies: Iterable[Policy], accounts: Collection[str] | None, now: float
) -> dict[str, float]:
    """policy -> expected interval, for the enabled policies of the accounts served."""
    at = datetime.fromtimestamp(now, UTC)
    found = {}
    for policy in policies:
        if accounts is not None and policy.account not in accounts:
            continue
        interval = rpo.expected_interval(policy, at)
        if interval is not None:
            found[policy.name] = interval
    return found


def _overdue(
    rpos: Mapping[str, float], instances: Mapping[tuple[str, str], float], now: float
) -> dict[str, int]:
    """policy -> how many of its targets have no good image within its RPO (0 included)."""
    counts = dict.fromkeys(rpos, 0)
    for (policy, _), at in instances.items():
        if policy in rpos and rpo.is_overdue(at, now, rpos[policy]):
            counts[policy] += 1
    return counts


def _reason(outcome: str, reason: str | None) -> str:
    known = OUTCOME_REASONS.get(outcome, ())
    return reason if reason in known else OTHER


def _finished(rows: Iterable[Any]) -> tuple[Finished, ...]:
    return tuple(
        Finished(
            id=int(r["id"]),
            policy=r["policy"],
            outcome=r["state"],
            reason=_reason(r["state"], r["reason"]),
            at=float(r["at"]),
        )
        for r in rows
    )


async def read_database(
    pool: asyncpg.Pool,
    held: Collection[str] | None = None,
    *,
    finished_since: float | None = None,
) -> DatabaseSnapshot:
    """One consistent read of every database number, for the accounts in `held` (None: all).

    With `finished_since` (Unix time), also the jobs finished after it.
    """
    accounts = None if held is None else sorted(held)
    conn: Any
    async with pool.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
        now = float(await conn.fetchval("SELECT extract(epoch FROM now())"))
        names = [r["name"] for r in await conn.fetch(_POLICIES, accounts)]
        job_rows = await conn.fetch(_LIVE_JOBS, accounts)
        image_rows = await conn.fetch(_IMAGES, accounts)
        good_rows = await conn.fetch(_LAST_GOOD, accounts)
        target_rows = await conn.fetch(_TARGETS, accounts)
        copy_rows = await conn.fetch(_COPY_TARGETS, accounts)
        paused_rows = await conn.fetch(_PAUSED, accounts)
        finished_rows = (
            await conn.fetch(_FINISHED, accounts, finished_since)
            if finished_since is not None
            else []
        )
        enabled = await policy_rows.fetch_policies(conn, enabled_only=True)
    instances = _instance_freshness(target_rows)
    rpos = _rpos(enabled, held, now)
    return DatabaseSnapshot(
        up=True,
        now=now,
        policies=tuple(names),
        jobs=_live_counts(names, job_rows),
        images={(r["account"], r["region"], r["state"]): int(r["n"]) for r in image_rows},
        last_good={r["policy"]: float(r["at"]) for r in good_rows},
        instances=instances,
        copies=_instance_freshness(copy_rows, ("policy", "instance_id", "region")),
        rpo=rpos,
        overdue=_overdue(rpos, instances, now),
        paused={r["account"]: float(r["at"]) for r in paused_rows},
        finished=_finished(finished_rows),
    )


def _gauge(name: str, doc: str, labels: Sequence[str], values: Mapping[Any, float]) -> Metric:
    family = GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))
    for key, value in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family


class FinishedCounter:
    """Jobs finished since this process started, per (policy, outcome, reason).

    Fed from each scrape's read of recently finished jobs; each job counts once.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        self.since: float | None = None  # None until the first read set the starting point
        # Jobs that finished before the starting point belong to whoever ran then.
        self._floor = 0.0
        self._seen: dict[int, float] = {}  # job id -> finished at, within the overlap

    def read_from(self) -> float | None:
        """Where the next read starts (Unix time), or None before the starting point is set."""
        return None if self.since is None else self.since - FINISHED_OVERLAP

    def add(self, finished: Iterable[Finished], now: float) -> None:
        """Count the jobs not counted yet; the next read starts from `now`."""
        if self.since is None:
            self._floor = now
        else:
            for job in finished:
                if job.at > self._floor and job.id not in self._seen:
                    self._seen[job.id] = job.at
                    key = (job.policy, job.outcome, job.reason)
                    self.counts[key] = self.counts.get(key, 0) + 1
        self.since = now
        # The next read goes back FINISHED_OVERLAP from `now`; twice that leaves room for the
        # float round trip through to_timestamp().
        horizon = now - 2 * FINISHED_OVERLAP
        self._seen = {i: at for i, at in self._seen.items() if at > horizon}

    def family(self, policies: Iterable[str]) -> Metric:
        """The counter, with a 0 for every known (outcome, reason) of every policy served."""
        family = CounterMetricFamily(
            PREFIX + "jobs_finished",
            "Jobs that reached a terminal state since this process started, by policy, outcome"
            " and reason (counted by the replica holding the account's lease).",
            labels=["policy", "outcome", "reason"],
        )
        values = {
            (policy, outcome, reason): 0
            for policy in policies
            for outcome, reasons in OUTCOME_REASONS.items()
            for reason in reasons
        }
        values.update(self.counts)
        for key, value in sorted(values.items()):
            family.add_metric(list(key), value)
        return family


class _DatabaseCollector(Collector):
    """Yields the last database snapshot at scrape time."""

    def __init__(self, finished: FinishedCounter) -> None:
        self.snapshot = DatabaseSnapshot()
        self.finished = finished
        # Policies served the last time the database answered: the counter keeps its zeros.
        self.policies: tuple[str, ...] = ()

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        up = {(): 1.0 if snap.up else 0.0}
        yield _gauge("database_up", "1 when the last scrape could read Postgres.", [], up)
        if snap.up:
            yield from self._tables(snap)
            yield from self._freshness(snap)
        if self.finished.since is not None:
            yield self.finished.family(self.policies)

    def _tables(self, snap: DatabaseSnapshot) -> Iterator[Metric]:
        yield _gauge(
            "jobs",
            "Live (not yet terminal) jobs by policy and state; finished ones are"
            " cvm_backup_jobs_finished_total.",
            ["policy", "state"],
            snap.jobs,
        )
        yield _gauge(
            "images",
            "Our images not yet deleted, by account, region and image state.",
            ["account", "region", "state"],
            snap.images,
        )
        yield _gauge(
            "account_paused_since_timestamp_seconds",
            "When an account-wide error paused the account (Unix time); absent when not paused.",
            ["account"],
            snap.paused,
        )

    def _freshness(self, snap: DatabaseSnapshot) -> Iterator[Metric]:
        yield _gauge(
            "last_success_timestamp_seconds",
            "When the newest good image of any of the policy's instances was taken (Unix time);"
            " see cvm_backup_instance_last_success_timestamp_seconds for each instance.",
            ["policy"],
            snap.last_good,
        )
        yield _gauge(
            "last_success_age_seconds",
            "Seconds since the newest good image of any of the policy's instances was taken.",
            ["policy"],
            {policy: max(snap.now - at, 0.0) for policy, at in snap.last_good.items()},
        )
        yield _gauge(
            "instance_last_success_timestamp_seconds",
            "When the newest good image of a target instance was taken (Unix time); 0 when it"
            " has none and its first job has ended or run out of window.",
            ["policy", "instance_id"],
            snap.instances,
        )
        yield _gauge(
            "copy_last_success_timestamp_seconds",
            "When the newest good copy of a target instance's backup in a destination region"
            " (policies.copies) was made (Unix time); 0 when there is none and the instance's"
            " first copy job there has ended or run out of window.",
            ["policy", "instance_id", "region"],
            snap.copies,
        )
        yield _gauge(
            "policy_rpo_seconds",
            "How old a good image may be now under the policy's schedule: from the newest slot"
            " whose completion window closed to the next slot, plus the window.",
            ["policy"],
            snap.rpo,
        )
        yield _gauge(
            "policy_instances_overdue",
            "Target instances whose newest good image is older than the policy's RPO.",
            ["policy"],
            snap.overdue,
        )

    def describe(self) -> Iterable[Metric]:
        # Empty: the registry must not call collect() (and read a stale snapshot) at register.
        return ()


class _ProcessStateCollector(Collector):
    """Limiters, leases and quota: what this process knows without asking the database."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._limiters()
        held = self.metrics.served()
        leases = {a: 1.0 if held is None or a in held else 0.0 for a in self.metrics.accounts}
        yield _gauge(
            "account_lease_held",
            "1 while this process drives the account's API traffic (holds its lease), else 0.",
            ["account"],
            leases,
        )
        quota = {k: v for k, v in self.metrics.quota.items() if held is None or k[0] in held}
        yield _gauge(
            "image_quota",
            "Custom-image quota per account and region, as DescribeImageQuota last said.",
            ["account", "region"],
            quota,
        )

    def _limiters(self) -> Iterator[Metric]:
        labels = ["account", "action"]
        wait = SummaryMetricFamily(
            PREFIX + "limiter_wait_seconds",
            "Time calls waited for the rate limiter, per account and action.",
            labels=labels,
        )
        rate = GaugeMetricFamily(
            PREFIX + "limiter_rate",
            "Calls per second the limiter grants now (below full rate after throttling).",
            labels=labels,
        )
        full = GaugeMetricFamily(
            PREFIX + "limiter_full_rate",
            "Calls per second the limiter grants when nothing was throttled.",
            labels=labels,
        )
        throttles = CounterMetricFamily(
            PREFIX + "limiter_throttles",
            "RequestLimitExceeded answers that reached the limiter, per account and action.",
            labels=labels,
        )
        for limiters in self.metrics.limiters:
            for (account, action), stats in sorted(limiters.snapshot().items()):
                wait.add_metric([account, action], stats.calls, stats.total_wait)
                rate.add_metric([account, action], stats.rate)
                full.add_metric([account, action], stats.full_rate)
                throttles.add_metric([account, action], stats.throttles)
        yield from (wait, rate, full, throttles)

    def describe(self) -> Iterable[Metric]:
        return ()


class Metrics:
    """The process's metrics; `render()` is the /metrics body.

    `held` (set by the health server) says which accounts' database numbers, leases and quota
    this process serves; None serves every account.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.held: Held | None = None
        self.accounts: tuple[str, ...] = ()
        self.limiters: list[Limiters] = []
        self.quota: dict[tuple[str, str], float] = {}
        self._codes: set[str] = set()
        self.api_calls = Counter(
            PREFIX + "api_calls",
            "CVM API HTTP attempts by account, action, region and result code ('ok': success).",
            ["account", "action", "region", "code"],
            registry=self.registry,
        )
        build = GaugeMetricFamily(
            PREFIX + "build_info", "The running cvm-backup version; always 1.", labels=["version"]
        )
        build.add_metric([__version__], 1)
        self.registry.register(_Constant(build))
        self.finished = FinishedCounter()
        self._database = _DatabaseCollector(self.finished)
        self.registry.register(self._database)
        self.registry.register(_ProcessStateCollector(self))
        # The standard process_*, python_gc_* and python_info series, in this registry.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def served(self) -> Collection[str] | None:
        """The accounts whose numbers this process serves now; None: all of them."""
        return None if self.held is None else frozenset(self.held())

    def api_call(self, account: str, action: str, region: str, code: str) -> None:
        """Count one API attempt (a `CvmClient` call observer)."""
        self.api_calls.labels(account, action, region, self._bounded(code)).inc()

    def _bounded(self, code: str) -> str:
        if code in self._codes:
            return code
        if not _CODE_RE.fullmatch(code) or len(self._codes) >= MAX_CODES:
            return OTHER
        self._codes.add(code)
        return code

    def watch_client(self, client: CvmClient) -> None:
        """Count the client's calls and report its limiter."""
        client.add_observer(self.api_call)
        limiter = client.limiter
        if isinstance(limiter, Limiters) and all(limiter is not lim for lim in self.limiters):
            self.limiters.append(limiter)

    def unwatch_client(self, client: CvmClient) -> None:
        """Stop counting the client's calls."""
        client.remove_observer(self.api_call)

    async def start(self, pool: asyncpg.Pool) -> None:
        """Start counting finished jobs from now (else from the first scrape)."""
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                now = await pool.fetchval("SELECT extract(epoch FROM now())")
        except DATABASE_ERRORS:
            return
        self.finished.add((), float(now))

    async def refresh(self, pool: asyncpg.Pool) -> None:
        """Re-read the database metrics; on failure they are dropped and database_up is 0."""
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                snap = await read_database(
                    pool, self.served(), finished_since=self.finished.read_from()
                )
        except DATABASE_ERRORS as exc:
            log.warning("metrics.database_unavailable", error=f"{type(exc).__name__}: {exc}")
            self._database.snapshot = DatabaseSnapshot()
            return
        self.finished.add(snap.finished, snap.now)
        self._database.snapshot = snap
        self._database.policies = snap.policies

    async def refresh_quota(self, ctx: EngineContext) -> None:
        """DescribeImageQuota for every (account, region) of an enabled policy we drive."""
        from orchestrator.tencent.errors import TencentError

        held = self.served()
        accounts = None if held is None else sorted(held)
        for row in await ctx.pool.fetch(_REGIONS, accounts):
            account, region = row["account"], row["region"]
            if account not in ctx.clients:
                continue
            try:
                quota = await ctx.client(account).describe_image_quota(region)
            except TencentError as exc:
                log.warning("metrics.quota_failed", account=account, region=region, code=exc.code)
                continue
            self.quota[(account, region)] = float(quota)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything."""
        return bytes(generate_latest(self.registry))


class _Constant(Collector):
    """Metrics whose value never changes (build info)."""

    def __init__(self, *families: Metric) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families

    def describe(self) -> Iterable[Metric]:
        return ()
