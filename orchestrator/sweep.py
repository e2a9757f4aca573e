"""The retention sweep: retention and max age over every (policy, instance) with live images.

Retention after a backup only looks at the instance just backed up, under the policy's current
account and region. That leaves images forever when an instance leaves a policy or is
terminated, a policy is disabled, pruned or renamed, or its region or account changes, and it
leaves an intent cut short by a transient error waiting for the next backup of that pair. The
sweep runs on its own schedule (daemon start, every `retention_interval`, and at the end of
`run --once`) over every pair with live images, enabled policy or not, in the account and
region where the images are. The newest NORMAL image of a pair is always kept
(retention.decide).

Each (account, region) is decided under rotation's region lock, so a sweep and a quota rotation
never act on different pictures of one region. A pair that cannot be evaluated (a timezone
zoneinfo does not know, any error of its own) is logged as `retention.skipped` and left for the
next pass; an account no configuration names is skipped the same way, once per region.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from orchestrator import logs, retention, rotation
from orchestrator.context import EngineContext
from orchestrator.db.resilience import DbWatch, is_connection_error
from orchestrator.rotation import Conn, LiveImage

log = logs.get("sweep")

KIND = "retention"  # the sweep's deletions are retention's: same events, same ledger kinds

# Where live images are: the regions to sweep. The images say where, not the policies.
_REGIONS = """
SELECT account, region, count(DISTINCT (policy_id, instance_id)) AS pairs
FROM images WHERE deleted_at IS NULL
GROUP BY account, region ORDER BY account, region
"""

# One region's live images, each with its policy's rules (wherever the policy points now).
_REGION_IMAGES = f"{rotation.REGION_IMAGES} ORDER BY i.policy_id, i.instance_id, i.created_at"


@dataclass
class SweepResult:
    """What one pass did: pairs looked at, deletions sent, (account, region, reason) skipped."""

    pairs: int = 0
    deleted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, other: SweepResult) -> None:
        """Fold one region's result into the pass's."""
        self.pairs += other.pairs
        self.deleted += other.deleted
        self.skipped += other.skipped


async def sweep(ctx: EngineContext, driven: Collection[str]) -> SweepResult:
    """One pass over every region with live images of the `driven` accounts."""
    result = SweepResult()
    for row in await ctx.pool.fetch(_REGIONS):
        account, region = row["account"], row["region"]
        if account not in ctx.clients:
            _skip_region(result, account, region, row["pairs"])
        elif account in driven:
            result.add(await sweep_region(ctx, account, region))
    level = log.info if result.deleted or result.skipped else log.debug
    level("retention.swept", pairs=result.pairs, deleted=len(result.deleted))
    return result


def _skip_region(result: SweepResult, account: str, region: str, pairs: int) -> None:
    reason = f"account {account!r} is not configured ([[accounts]])"
    log.warning("retention.skipped", account=account, region=region, pairs=pairs, reason=reason)
    result.skipped.append((account, region, reason))


async def sweep_region(ctx: EngineContext, account: str, region: str) -> SweepResult:
    """Retention over one (account, region), under its delete lock."""
    result = SweepResult()
    async with rotation.region_lock(ctx, account, region) as conn:
        # Deletions already in flight first: those gone are not judged again.
        await rotation.confirm_soon(ctx, conn, account, region, ())
        rows = await conn.fetch(_REGION_IMAGES, account, region)
        for group in rotation.per_instance(rows):
            result.pairs += 1
            bound = {"policy_id": group[0]["policy_id"], "instance_id": group[0]["instance_id"]}
            with structlog.contextvars.bound_contextvars(account=account, region=region, **bound):
                await _sweep_pair(ctx, conn, group, result)
        if result.deleted:
            await rotation.confirm_soon(ctx, conn, account, region, result.deleted)
    return result


async def _sweep_pair(ctx: EngineContext, conn: Conn, rows: list[Any], result: SweepResult) -> None:
    try:
        result.deleted += await sweep_pair(ctx, conn, rows)
    except Exception as exc:
        # The lock's connection is gone: every later pair would fail the same way.
        if is_connection_error(exc):
            raise
        reason = f"error: {exc!r}"
        log.warning("retention.skipped", reason=reason)
        result.skipped.append((rows[0]["account"], rows[0]["region"], reason))


async def sweep_pair(ctx: EngineContext, conn: Conn, rows: Sequence[Any]) -> list[str]:
    """Finish the pair's pending intents, then delete what retention lets go; the ids sent."""
    images = [LiveImage.from_record(r) for r in rows]
    done = await rotation.finish_pending(ctx, conn, KIND, images)
    decisions = rotation.decide_or_skip(rows[0], images)
    if decisions is None:
        return done
    by_id = {i.image_id: i for i in images}
    # Oldest first: a pass cut short leaves the newer images, not holes in the middle.
    for d in reversed(retention.deletions(decisions)):
        if await rotation.delete_image(ctx, conn, KIND, by_id[d.image_id], d.reasons[0]):
            done.append(d.image_id)
    return done


async def run(
    ctx: EngineContext, stop: asyncio.Event, driven: Callable[[], Collection[str]]
) -> None:
    """Sweep at once, then every `retention_interval`, until `stop`."""
    watch = DbWatch("retention", stop)
    while not stop.is_set():
        async with watch:
            await sweep(ctx, driven())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=ctx.settings.retention_interval)
