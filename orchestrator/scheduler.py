"""The scheduler: cron slots of enabled policies -> one run and its jobs per (policy, slot).

Idempotent per slot: `runs (policy_id, slot)` and `jobs (policy_id, instance_id, slot, region)` are
unique and inserted with ON CONFLICT DO NOTHING, so two replicas or a restart create nothing
twice. After downtime only the most recent missed slot runs, and only while its completion
window is still open: a daemon that was down for a week makes one backup, not seven.

Policy changes are picked up without a restart: NOTIFY on `cvm_backup_policy_changed` wakes the
loop at once (speed), and a pass every `poll_interval` catches anything a lost NOTIFY missed
(correctness).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from orchestrator import backoff, jobs, logs, naming, policies
from orchestrator.context import EngineContext
from orchestrator.db import policies as policy_rows
from orchestrator.db.resilience import DbWatch
from orchestrator.errors import UsageError
from orchestrator.policies import Policy
from orchestrator.tencent.client import PAGE_SIZE, CvmClient
from orchestrator.tencent.errors import ErrorClass, TencentError
from orchestrator.tencent.models import Filter, InstancePage

CHANNEL = "cvm_backup_policy_changed"
# How far past a slot the loop wakes: enough for timer rounding (epoll counts whole ms), and a
# wake-up that still comes early just sleeps the rest. Every ms of it delays the first call.
_SLOT_PAD = 0.005
# No resource of the account carries a filtered tag key yet (docs/design.md#filters-and-paging): no
# instance can match, which is an answer (no targets), not a failure.
TAG_KEY_NOT_FOUND = "InvalidParameterValue.TagKeyNotFound"
# An unknown region answers InvalidParameterValue naming `Region`; an action a region lacks answers
# UnsupportedRegion (docs/design.md#regions). Neither gets better by asking again in the slot.
_REGION_CODES = frozenset({"UnsupportedRegion", "InvalidRegion.NotFound"})
_NAMES_REGION = re.compile(r"\bRegion\b")
REGION_REFUSED = "schedule.region_refused"
log = logs.get("scheduler")


@dataclass(frozen=True, slots=True)
class Targets:
    """The instances a run backs up, and the explicit ids that no longer exist."""

    present: tuple[str, ...]
    missing: tuple[str, ...]
    # Why the tag query matched nothing, when the API said why (an unknown tag key).
    unmatched: str = ""

    @property
    def no_targets(self) -> str | None:
        """Why a run would back up nothing; None when it has instances to back up."""
        if self.present:
            return None
        if self.unmatched:
            return self.unmatched
        if self.missing:
            return "no explicit instance id exists any more"
        return "no instance matches the policy"


def refuses_region(exc: TencentError) -> bool:
    """Whether an API answer says the region itself is wrong (unknown, or lacks the action)."""
    if exc.code in _REGION_CODES:
        return True
    return exc.code.startswith("InvalidParameterValue") and bool(_NAMES_REGION.search(exc.message))


def region_problem(policy: Policy, exc: TencentError) -> str:
    """What a region refusal means for `policy`, for logs and `plan`."""
    return (
        f"the API refuses region {policy.region!r} of policy {policy.name!r}"
        f" (account {policy.account!r}): {exc}; fix the policy's region"
    )


@dataclass(frozen=True, slots=True)
class Scheduled:
    """The run of one (policy, slot): `created` is False when it already existed."""

    run_id: int
    policy: str
    slot: datetime
    created: bool
    jobs: int = 0
    skipped: int = 0


async def load_policies(pool: asyncpg.Pool) -> list[Policy]:
    """Enabled policies; rows that fail validation (e.g. a cron croniter refuses) are logged."""
    return await policy_rows.fetch_policies(pool, enabled_only=True)


def due_slot(policy: Policy, now: datetime) -> datetime | None:
    """The newest slot at or before `now` whose completion window is still open."""
    slot = policies.latest_slot_at_or_before(policy, now)
    return slot if slot + policy.completion_window > now else None


async def resolve_targets(ctx: EngineContext, policy: Policy) -> Targets:
    """Explicit instance ids that exist, plus every instance carrying all `instance_tags`."""
    client = ctx.client(policy.account)
    found: dict[str, None] = {}
    missing: list[str] = []
    if policy.instance_ids:
        existing = await _existing(ctx, policy, policy.instance_ids)
        missing = [i for i in policy.instance_ids if i not in existing]
        found.update((i, None) for i in policy.instance_ids if i in existing)
    unmatched = ""
    if policy.instance_tags:
        tagged, unmatched = await _tag_matches(client, policy)
        found.update((i, None) for i in tagged)
    return Targets(tuple(found), tuple(missing), unmatched)


async def _tag_matches(client: CvmClient, policy: Policy) -> tuple[list[str], str]:
    """Instances carrying all the policy's tags; none, and why, when a tag key is unknown."""
    try:
        return await tagged_instances(client, policy.region, _tag_filters(policy)), ""
    except TencentError as exc:
        if exc.code != TAG_KEY_NOT_FOUND:
            raise
        return [], _unknown_key(policy, exc.message)


def _unknown_key(policy: Policy, message: str) -> str:
    # The real message's wording is not documented: name the key it quotes, else every key.
    quoted = [k for k in sorted(policy.instance_tags) if _quotes(message, k)]
    keys = quoted or sorted(policy.instance_tags)
    shown = ", ".join(f"`{k}`" for k in keys)
    if len(keys) == 1:
        return f"no instance carries tag key {shown}"
    return f"no instance carries one of the tag keys {shown}"


def _quotes(message: str, key: str) -> bool:
    return any(f"{q}{key}{q}" in message for q in "`'\"")


# The last instance count seen per tag query (account, region, filters), so the next
# resolution asks for all its pages at once. Process memory only: a stale count costs a page
# or a round trip, never a wrong answer.
_known_counts: dict[tuple[str, str, tuple[Filter, ...]], int] = {}
# Counts are learned ahead of a slot no sooner than this (seconds) ...
PROBE_AHEAD = 120.0
# ... and no later: a probe right before a slot would hold the slot's first page back.
PROBE_CLEARANCE = 1.0


def _query(
    client: CvmClient, region: str, filters: Sequence[Filter]
) -> tuple[str, str, tuple[Filter, ...]]:
    return (client.account, region, tuple(filters))


def _tag_filters(policy: Policy) -> list[Filter]:
    # One filter per tag: Filters are ANDed, so an instance must carry all of them.
    return [Filter(f"tag:{k}", (v,)) for k, v in sorted(policy.instance_tags.items())]


async def tagged_instances(client: CvmClient, region: str, filters: Sequence[Filter]) -> list[str]:
    """Ids of every instance matching `filters`; pages known to exist are fetched together."""
    key = _query(client, region, filters)
    found: dict[str, None] = {}
    covered, total = 0, max(_known_counts.get(key, 1), 1)
    while covered < total:
        # Every page the count says is there goes out at once (each still through the
        # limiter) instead of one round trip after another: the slot's first call comes sooner.
        # Without a count that is the first page alone, which gives it.
        offsets = range(covered, total, PAGE_SIZE)
        pages = await asyncio.gather(*(_page(client, region, filters, o) for o in offsets))
        found.update((i.instance_id, None) for page in pages for i in page.instances)
        reached, total = _coverage(covered, offsets, pages)
        if reached == covered:
            break  # an empty page short of the count: the fleet shrank while we paged
        covered = reached
    _known_counts[key] = total
    return list(found)


def _coverage(start: int, offsets: Iterable[int], pages: Sequence[InstancePage]) -> tuple[int, int]:
    """How far past `start` the pages cover the listing without a gap, and its latest count."""
    reached = start
    for offset, page in zip(offsets, pages, strict=True):
        if offset > reached:
            break  # a page came back short: what follows it is fetched again
        reached = max(reached, offset + len(page.instances))
    return reached, max(page.total_count for page in pages)


async def _page(
    client: CvmClient, region: str, filters: Sequence[Filter], offset: int
) -> InstancePage:
    return await client.describe_instances(region, filters=filters, offset=offset)


async def learn_counts(ctx: EngineContext, found: Sequence[Policy], now: datetime) -> None:
    """Count the instances of tag queries whose slot is near and whose count is unknown."""
    slots = {policy.name: _next_slot(policy, now) for policy in found}
    # Never into any policy's next slot: a probe starts only PROBE_CLEARANCE before it, at the
    # latest, and gives up after half of that.
    ahead = {name: (slot - now).total_seconds() for name, slot in slots.items() if slot}
    first = min(ahead.values(), default=0.0)
    clock = asyncio.get_running_loop()
    started = clock.time()
    for policy in found:
        if not policy.instance_tags or ahead.get(policy.name, math.inf) > PROBE_AHEAD:
            continue
        if first - (clock.time() - started) < PROBE_CLEARANCE:
            return
        try:
            async with asyncio.timeout(PROBE_CLEARANCE / 2):
                await _learn_count(ctx, policy)
        except (TencentError, LookupError, TimeoutError) as exc:
            # Only a hint: the slot resolves its targets page by page without it.
            log.debug("schedule.count_failed", policy=policy.name, error=repr(exc))


async def _learn_count(ctx: EngineContext, policy: Policy) -> None:
    client = ctx.client(policy.account)
    key = _query(client, policy.region, _tag_filters(policy))
    if key not in _known_counts:
        _known_counts[key] = await _count(client, policy.region, key[2])


async def _count(client: CvmClient, region: str, filters: Sequence[Filter]) -> int:
    try:
        page = await client.describe_instances(region, filters=filters, limit=1)
    except TencentError as exc:
        if exc.code != TAG_KEY_NOT_FOUND and not refuses_region(exc):
            raise
        # Nothing to count (no instance carries the key, or the region is refused): a count of
        # 0 stops the probes; the slot still asks for its first page and reports what it gets.
        return 0
    return page.total_count


def _next_slot(policy: Policy, now: datetime) -> datetime | None:
    try:
        return policies.next_slot_after(policy, now)
    except (ValueError, KeyError, ArithmeticError):
        return None


async def _existing(ctx: EngineContext, policy: Policy, ids: Sequence[str]) -> set[str]:
    client = ctx.client(policy.account)
    try:
        return {i.instance_id async for i in client.iter_instances(policy.region, instance_ids=ids)}
    except TencentError as exc:
        if exc.error_class is not ErrorClass.GONE:
            raise
    if len(ids) == 1:
        return set()
    # Some APIs refuse a whole batch for one unknown id: ask for each id on its own.
    found: set[str] = set()
    for instance_id in ids:
        found |= await _existing(ctx, policy, [instance_id])
    return found


async def create_run(
    pool: asyncpg.Pool, policy: Policy, slot: datetime, targets: Targets, trigger: str
) -> Scheduled:
    """Insert the run and its jobs in one transaction; nothing when the slot already has a run."""
    assert policy.id is not None
    async with pool.acquire() as conn, conn.transaction():
        run_id = await conn.fetchval(
            "INSERT INTO runs (policy_id, slot, trigger) VALUES ($1, $2, $3)"
            " ON CONFLICT (policy_id, slot) DO NOTHING RETURNING id",
            policy.id,
            slot,
            trigger,
        )
        if run_id is None:
            existing = await conn.fetchval(
                "SELECT id FROM runs WHERE policy_id = $1 AND slot = $2", policy.id, slot
            )
            return Scheduled(int(existing), policy.name, slot, created=False)
        await _insert_jobs(conn, run_id, policy, slot, targets)
        await jobs.notify_due(conn)
        await conn.execute(
            "INSERT INTO events (kind, policy_id, run_id, reason, details)"
            " VALUES ('run.created', $1, $2, $3, $4)",
            policy.id,
            run_id,
            trigger,
            _run_details(slot, targets),
        )
    return Scheduled(
        int(run_id), policy.name, slot, True, len(targets.present), len(targets.missing)
    )


def _run_details(slot: datetime, targets: Targets) -> dict[str, Any]:
    details: dict[str, Any] = {
        "slot": slot.isoformat(),
        "jobs": len(targets.present),
        "missing": list(targets.missing),
    }
    if targets.no_targets is not None:
        details["no_targets"] = targets.no_targets
    return details


async def _insert_jobs(
    conn: Any, run_id: int, policy: Policy, slot: datetime, targets: Targets
) -> None:
    ids = [*targets.present, *targets.missing]
    names = [naming.image_name(policy.name, i, slot) for i in ids]
    # Explicit ids DescribeInstances no longer knows are recorded at once as skipped.
    states = ["pending"] * len(targets.present) + ["skipped"] * len(targets.missing)
    await conn.execute(
        """
        INSERT INTO jobs (run_id, policy_id, account, region, instance_id, slot, image_name,
                          deadline, state, reason, finished_at)
        SELECT $1, $2, $3, $4, t.instance_id, $5, t.image_name, $5::timestamptz + $6::interval,
               t.state, CASE WHEN t.state = 'skipped' THEN 'instance_gone' END,
               CASE WHEN t.state = 'skipped' THEN now() END
        FROM unnest($7::text[], $8::text[], $9::text[]) AS t(instance_id, image_name, state)
        ON CONFLICT (policy_id, instance_id, slot, region) DO NOTHING
        """,
        run_id,
        policy.id,
        policy.account,
        policy.region,
        slot,
        policy.completion_window,
        ids,
        names,
        states,
    )


async def schedule_policy(
    ctx: EngineContext, policy: Policy, slot: datetime, trigger: str = "schedule"
) -> Scheduled:
    """Create the run of `policy` for `slot` unless it exists; resolves targets only if needed."""
    assert policy.id is not None
    existing = await ctx.pool.fetchval(
        "SELECT id FROM runs WHERE policy_id = $1 AND slot = $2", policy.id, slot
    )
    if existing is not None:
        return Scheduled(int(existing), policy.name, slot, created=False)
    targets = await resolve_targets(ctx, policy)
    scheduled = await create_run(ctx.pool, policy, slot, targets, trigger)
    if scheduled.created:
        _log_created(scheduled, policy, targets, trigger)
    return scheduled


def _log_created(scheduled: Scheduled, policy: Policy, targets: Targets, trigger: str) -> None:
    log.info(
        "run.created",
        run=scheduled.run_id,
        policy=policy.name,
        slot=scheduled.slot.isoformat(),
        jobs=scheduled.jobs,
        trigger=trigger,
    )
    if targets.no_targets is not None:
        # Once per slot: the run exists now, so later passes do not resolve targets again.
        log.warning(
            "schedule.no_targets",
            run=scheduled.run_id,
            policy=policy.name,
            slot=scheduled.slot.isoformat(),
            reason=targets.no_targets,
        )
    for instance_id in targets.missing:
        log.info(
            "job.skipped",
            policy=policy.name,
            instance=instance_id,
            reason="instance_gone",
            run=scheduled.run_id,
        )


# The accounts this process drives (their lease held); None: every configured account.
Driven = Callable[[], Collection[str]] | None


async def schedule_pass(
    ctx: EngineContext, now: datetime | None = None, driven: Driven = None
) -> list[Scheduled]:
    """One pass over every enabled policy; the runs it created. A bad policy never stops others."""
    now = now or datetime.now(UTC)
    created = []
    for policy in _ours(ctx, await load_policies(ctx.pool), driven):
        result = await _schedule_one(ctx, policy, now)
        if result is not None and result.created:
            created.append(result)
    return created


def _ours(ctx: EngineContext, found: Sequence[Policy], driven: Driven) -> list[Policy]:
    """Policies whose targets this process may resolve: only the lease holder calls the API.

    An account that is not configured at all stays in, so its policies keep reporting that.
    """
    if driven is None:
        return list(found)
    held = driven()
    return [p for p in found if p.account in held or p.account not in ctx.clients]


# What one policy's pass may raise without stopping the others: the API, a missing account, a
# cron or timezone that broke, a value that overflows date arithmetic in Python or Postgres.
_POLICY_FAILURES = (
    TencentError,
    LookupError,
    ValueError,
    KeyError,
    ArithmeticError,
    asyncpg.DataError,
)


async def _schedule_one(ctx: EngineContext, policy: Policy, now: datetime) -> Scheduled | None:
    try:
        slot = due_slot(policy, now)
        if slot is None:
            return None
        if policy.account not in ctx.clients:
            raise LookupError(f"account {policy.account!r} is not configured")
        if await _settled(ctx.pool, policy, slot):
            return None
        return await _scheduled_or_refused(ctx, policy, slot)
    except _POLICY_FAILURES as exc:
        # Retried on the next pass, and so reported on each.
        log.error(
            "schedule.failed", policy=policy.name, error=str(exc), code=getattr(exc, "code", None)
        )
        return None


# The slot has its run, or the API refused the policy's region for it already (a ledger row, so
# every replica and restart sees it): either way this pass has nothing to ask the API.
_SETTLED = f"""
SELECT EXISTS (SELECT 1 FROM runs WHERE policy_id = $1 AND slot = $2)
    OR EXISTS (SELECT 1 FROM events WHERE kind = '{REGION_REFUSED}' AND policy_id = $1
               AND region = $3 AND details->>'slot' = $4)
"""


async def _settled(pool: asyncpg.Pool, policy: Policy, slot: datetime) -> bool:
    found = await pool.fetchval(_SETTLED, policy.id, slot, policy.region, slot.isoformat())
    return bool(found)


async def _scheduled_or_refused(
    ctx: EngineContext, policy: Policy, slot: datetime
) -> Scheduled | None:
    """The slot's run; None, recorded once, when the API refuses the policy's region."""
    try:
        return await _with_retries(ctx, policy, slot)
    except TencentError as exc:
        if not refuses_region(exc):
            raise
        await _record_refusal(ctx.pool, policy, slot, exc)
        return None


async def _record_refusal(
    pool: asyncpg.Pool, policy: Policy, slot: datetime, exc: TencentError
) -> None:
    details = {"slot": slot.isoformat(), "message": exc.message, "request_id": exc.request_id}
    await pool.execute(
        "INSERT INTO events (kind, policy_id, account, region, reason, details)"
        f" VALUES ('{REGION_REFUSED}', $1, $2, $3, $4, $5)",
        policy.id,
        policy.account,
        policy.region,
        exc.code,
        details,
    )
    log.error(
        "schedule.region_refused",
        policy=policy.name,
        account=policy.account,
        region=policy.region,
        slot=slot.isoformat(),
        code=exc.code,
        request_id=exc.request_id,
        error=region_problem(policy, exc),
    )


async def _with_retries(ctx: EngineContext, policy: Policy, slot: datetime) -> Scheduled:
    """schedule_policy, retrying transient API failures of target resolution a few times."""
    retry = ctx.settings.retry
    for attempt in range(1, retry.max_transient_attempts + 1):
        try:
            return await schedule_policy(ctx, policy, slot)
        except TencentError as exc:
            retriable = exc.error_class in (ErrorClass.TRANSIENT, ErrorClass.THROTTLED)
            if not retriable or attempt == retry.max_transient_attempts:
                raise
            log.info("schedule.retry", policy=policy.name, code=exc.code, attempt=attempt)
            await asyncio.sleep(backoff.delay(attempt, retry.transient_base, retry.max_delay))
    raise AssertionError("unreachable")


async def backup_now(ctx: EngineContext, name: str, now: datetime | None = None) -> Scheduled:
    """A manual run for the current minute's slot; the same minute twice creates nothing new."""
    policy = await policy_rows.fetch_policy(ctx.pool, name)
    if policy is None:
        raise UsageError(f"backup-now: no policy named {name!r}")
    if not policy.enabled:
        raise UsageError(f"backup-now: policy {name!r} is disabled")
    slot = (now or datetime.now(UTC)).replace(second=0, microsecond=0)
    return await schedule_policy(ctx, policy, slot, trigger="manual")


def next_wakeup(found: Iterable[Policy], now: datetime, cap: float) -> float:
    """Seconds until the earliest next slot of `found`, at most `cap`."""
    wait = cap
    for policy in found:
        with contextlib.suppress(ValueError, KeyError, ArithmeticError):
            upcoming = policies.next_slot_after(policy, now)
            # A little past the boundary, so the pass that wakes sees the new slot as due.
            wait = min(wait, max((upcoming - now).total_seconds(), 0.0) + _SLOT_PAD)
    return wait


class Scheduler:
    """The scheduling loop: a pass per slot, per NOTIFY, and per poll interval."""

    def __init__(
        self, ctx: EngineContext, on_created: asyncio.Event | None = None, driven: Driven = None
    ) -> None:
        self.ctx = ctx
        self.on_created = on_created  # set after a pass that created runs (wakes the dispatcher)
        self.driven = driven
        self._changed = asyncio.Event()
        self.passes = 0  # completed scheduling passes (observability and tests)
        self._db = DbWatch("scheduler")

    def _notified(self, *_: object) -> None:
        self._changed.set()

    def leases_changed(self) -> None:
        """An account lease was gained: pass again now (its slot may be due and unscheduled)."""
        self._changed.set()

    def _jobs_due(self, *_: object) -> None:
        if self.on_created is not None:
            self.on_created.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Schedule until `stop` is set, listening for policy changes on a held connection."""
        self._db.stop = stop
        while not stop.is_set():
            # The database away (a restart): back off, then listen on a fresh connection.
            async with self._db, self.ctx.pool.acquire() as conn:
                await conn.add_listener(CHANNEL, self._notified)
                await conn.add_listener(jobs.JOBS_DUE_CHANNEL, self._jobs_due)
                # A NOTIFY sent before we listened is lost: look for due jobs once now instead.
                self._jobs_due()
                try:
                    await self._loop(conn, stop)
                finally:
                    with contextlib.suppress(Exception):
                        await conn.remove_listener(CHANNEL, self._notified)
                        await conn.remove_listener(jobs.JOBS_DUE_CHANNEL, self._jobs_due)

    async def _loop(self, conn: Any, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._changed.clear()
            await self.pass_once()
            # Probe the listening connection: a dead one would silently stop NOTIFYs.
            await conn.fetchval("SELECT 1")
            self._db.ok()
            found = await load_policies(self.ctx.pool)
            await learn_counts(self.ctx, _ours(self.ctx, found, self.driven), datetime.now(UTC))
            now = datetime.now(UTC)
            await self._wait(stop, seconds=next_wakeup(found, now, self.ctx.settings.poll_interval))

    async def pass_once(self, now: datetime | None = None) -> list[Scheduled]:
        """One scheduling pass; wakes the dispatcher when it created runs."""
        created = await schedule_pass(self.ctx, now, self.driven)
        self.passes += 1
        if created and self.on_created is not None:
            self.on_created.set()
        return created

    async def _wait(self, stop: asyncio.Event, *, seconds: float) -> None:
        waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._changed.wait())}
        _, pending = await asyncio.wait(
            waiters, timeout=max(seconds, 0.01), return_when=asyncio.FIRST_COMPLETED
        )
        for waiter in pending:
            waiter.cancel()
