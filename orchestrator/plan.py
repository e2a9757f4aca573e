"""What a run of a policy would do now, without doing it: targets, retention deletes, DryRuns.

The plan models a run for the current minute's slot, as `backup-now` would make it:
- targets are resolved exactly like the scheduler does (explicit ids + tag matches), and
  explicit ids DescribeInstances does not know are marked missing (a run would skip them);
- retention is decided like the rotator does after each backup, on our images in the `images`
  table plus the image this run would add (assuming the backup succeeds): an image that the
  new backup pushes out of `keep_last` shows up as a deletion here;
- each target gets a CreateImage DryRun with the very parameters the dispatcher would send,
  which proves credentials, permissions and instance states before the first real run.

Nothing is written: no job, no event, no image; DryRun creates nothing at Tencent.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from orchestrator import naming, retention, scheduler
from orchestrator.context import EngineContext
from orchestrator.db import policies as policy_rows
from orchestrator.errors import UsageError
from orchestrator.policies import CopyTarget, Policy, copies_raw
from orchestrator.retention import Candidate, Rules
from orchestrator.tencent.client import DRY_RUN_OK
from orchestrator.tencent.errors import TencentError

DUPLICATE = "InvalidImageName.Duplicate"
# Stands for the image this run would create, in retention's view only; never shown.
_NEW_IMAGE = "(this run)"

_IMAGES = """
SELECT image_id, instance_id, state, created_at, delete_requested_at, delete_reason
FROM images WHERE policy_id = $1 AND account = $2 AND region = $3 AND deleted_at IS NULL
ORDER BY instance_id, created_at DESC, image_id DESC
"""


class Unresolved(Exception):
    """The policy's instances could not be listed: the plan has nothing to DryRun (exit 1)."""


@dataclass(frozen=True, slots=True)
class DryRun:
    """The CreateImage DryRun of one instance; `ok` when the real call would be accepted."""

    ok: bool
    code: str
    message: str = ""
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """One instance a run would back up; `exists` is False for an unknown explicit id."""

    instance_id: str
    exists: bool
    dry_run: DryRun


@dataclass(frozen=True, slots=True)
class ImageVerdict:
    """Retention's verdict on one of our images, and why."""

    instance_id: str
    image_id: str
    state: str
    created: datetime
    action: str  # "keep" or "delete"
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run of `policy` at `slot` would do."""

    policy: str
    account: str
    region: str
    enabled: bool
    slot: datetime
    targets: tuple[Target, ...]
    images: tuple[ImageVerdict, ...]
    untargeted_images: int  # ours, of instances this run does not back up: left alone
    no_targets: str | None = None  # why a run would back up nothing (not an error)
    # Where each backup is copied once NORMAL (the policy's [[policies.copies]]).
    copies: tuple[CopyTarget, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every DryRun was accepted."""
        return all(t.dry_run.ok for t in self.targets)

    @property
    def deletions(self) -> tuple[ImageVerdict, ...]:
        """The images retention would delete."""
        return tuple(i for i in self.images if i.action == "delete")

    def to_json(self) -> dict[str, Any]:
        """The plan as plain JSON types (the `plan --json` document)."""
        return {
            "policy": self.policy,
            "account": self.account,
            "region": self.region,
            "enabled": self.enabled,
            "slot": self.slot.isoformat(),
            "ok": self.ok,
            "instances": [_target_json(t) for t in self.targets],
            "retention": [_image_json(i) for i in self.images],
            "untargeted_images": self.untargeted_images,
            "no_targets": self.no_targets,
            "copies": [self._copy_json(c) for c in self.copies],
        }

    def _copy_json(self, copy: CopyTarget) -> dict[str, Any]:
        return {
            "region": copy.region,
            "instances": sum(t.exists for t in self.targets),
            "retention": _copy_rules(copy),
        }


def _target_json(target: Target) -> dict[str, Any]:
    d = target.dry_run
    dry_run = {"ok": d.ok, "code": d.code, "message": d.message, "request_id": d.request_id}
    return {"instance_id": target.instance_id, "exists": target.exists, "dry_run": dry_run}


def _image_json(image: ImageVerdict) -> dict[str, Any]:
    return {
        "instance_id": image.instance_id,
        "image_id": image.image_id,
        "state": image.state,
        "created": image.created.isoformat(),
        "action": image.action,
        "reasons": list(image.reasons),
    }


# -- the policy -------------------------------------------------------------------------------


async def load_policy(pool: asyncpg.Pool, name: str) -> tuple[Policy, Rules]:
    """The named policy (enabled or not) and its retention rules; UsageError when unknown."""
    policy = await policy_rows.fetch_policy(pool, name)
    if policy is None:
        raise UsageError(f"plan: no policy named {name!r}")
    kept = policy.retention
    rules = Rules(
        keep_last=kept.keep_last,
        keep_daily=kept.keep_daily,
        keep_weekly=kept.keep_weekly,
        keep_monthly=kept.keep_monthly,
        keep_yearly=kept.keep_yearly,
        max_age_days=kept.max_age_days,
    )
    return policy, rules


# -- retention --------------------------------------------------------------------------------


def _pending(row: Any) -> ImageVerdict:
    # An intent already committed is carried out by the next sweep, whatever the rules say now.
    reason = f"pending delete intent: {row['delete_reason']}"
    return _verdict(row, "delete", (reason,))


def _verdict(row: Any, action: str, reasons: tuple[str, ...]) -> ImageVerdict:
    return ImageVerdict(
        row["instance_id"], row["image_id"], row["state"], row["created_at"], action, reasons
    )


def decide_instance(
    rules: Rules, timezone: str, now: datetime, rows: Sequence[Any], with_new: bool
) -> list[ImageVerdict]:
    """Retention over one instance's live images, as if this run's image had been added."""
    by_id = {r["image_id"]: r for r in rows}
    live = [r for r in rows if r["delete_requested_at"] is None]
    candidates = [Candidate(r["image_id"], r["created_at"], r["state"]) for r in live]
    if with_new:
        candidates.append(Candidate(_NEW_IMAGE, now, retention.NORMAL))
    verdicts = [_pending(r) for r in rows if r["delete_requested_at"] is not None]
    for d in retention.decide(rules, timezone, now, candidates):
        if d.image_id != _NEW_IMAGE:
            verdicts.append(_verdict(by_id[d.image_id], d.action, d.reasons))
    return verdicts


async def retention_plan(
    pool: asyncpg.Pool, policy: Policy, rules: Rules, present: Iterable[str], now: datetime
) -> tuple[list[ImageVerdict], int]:
    """Verdicts on the images of the instances a run backs up; and how many images are left."""
    rows = await pool.fetch(_IMAGES, policy.id, policy.account, policy.region)
    groups: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        groups[row["instance_id"]].append(row)
    targets = set(present)
    verdicts: list[ImageVerdict] = []
    for instance_id in sorted(targets):
        group = groups.get(instance_id, [])
        verdicts += decide_instance(rules, policy.timezone, now, group, with_new=True)
    untargeted = sum(len(g) for i, g in groups.items() if i not in targets)
    return verdicts, untargeted


# -- the DryRuns ------------------------------------------------------------------------------


async def dry_run(
    ctx: EngineContext, policy: Policy, instance_id: str, slot: datetime, disks: Sequence[str]
) -> DryRun:
    """CreateImage with DryRun and the dispatcher's parameters; any answer becomes a DryRun."""
    try:
        result = await ctx.client(policy.account).create_image(
            policy.region,
            instance_id=instance_id,
            name=naming.image_name(policy.name, instance_id, slot),
            description=naming.description(policy.name, instance_id, slot),
            force_poweroff=policy.force_poweroff,
            sysprep=policy.sysprep,
            data_disk_ids=disks,
            tags=naming.ours_tags(ctx.settings.deployment, policy.name),
            dry_run=True,
        )
    except TencentError as exc:
        if exc.code == DUPLICATE:
            # This slot's image exists already (a backup-now this minute): a run adopts it.
            return DryRun(True, exc.code, "this slot's image exists; a run adopts it")
        return DryRun(False, exc.code, exc.message, exc.request_id)
    return DryRun(True, DRY_RUN_OK, "the request would have succeeded", result.request_id)


async def data_disks(
    ctx: EngineContext, policy: Policy, present: Sequence[str]
) -> Mapping[str, tuple[str, ...]]:
    """DataDiskIds per instance for a whole-machine image; empty unless the policy wants it."""
    if not policy.include_data_disks or not present:
        return {}
    client = ctx.client(policy.account)
    found = client.iter_instances(policy.region, instance_ids=present)
    return {i.instance_id: i.data_disk_ids async for i in found}


async def dry_runs(
    ctx: EngineContext, policy: Policy, targets: scheduler.Targets, slot: datetime
) -> list[Target]:
    """One DryRun per target, missing explicit ids included (they show why they are missing)."""
    disks = await data_disks(ctx, policy, targets.present)
    # The limiter paces the calls; this only bounds open requests on a large fleet.
    gate = asyncio.Semaphore(ctx.settings.max_in_flight)

    async def one(instance_id: str, exists: bool) -> Target:
        async with gate:
            answer = await dry_run(ctx, policy, instance_id, slot, disks.get(instance_id, ()))
        return Target(instance_id, exists, answer)

    every = [(i, True) for i in targets.present] + [(i, False) for i in targets.missing]
    return list(await asyncio.gather(*(one(i, exists) for i, exists in every)))


# -- the whole plan ---------------------------------------------------------------------------


async def make_plan(ctx: EngineContext, name: str, now: datetime | None = None) -> Plan:
    """The plan of a run of policy `name` now; writes nothing, creates nothing."""
    now = now or datetime.now(UTC)
    slot = now.replace(second=0, microsecond=0)
    policy, rules = await load_policy(ctx.pool, name)
    if policy.account not in ctx.clients:
        raise UsageError(f"plan: policy {name!r} uses account {policy.account!r}, not configured")
    targets = await _resolve(ctx, policy)
    verdicts, untargeted = await retention_plan(ctx.pool, policy, rules, targets.present, now)
    return Plan(
        policy=policy.name,
        account=policy.account,
        region=policy.region,
        enabled=policy.enabled,
        slot=slot,
        targets=tuple(await dry_runs(ctx, policy, targets, slot)),
        images=tuple(verdicts),
        untargeted_images=untargeted,
        no_targets=targets.no_targets,
        copies=policy.copies,
    )


async def _resolve(ctx: EngineContext, policy: Policy) -> scheduler.Targets:
    """The targets as the scheduler resolves them; Unresolved when the API refuses to list."""
    try:
        return await scheduler.resolve_targets(ctx, policy)
    except TencentError as exc:
        raise Unresolved(_unresolved(policy, exc)) from None


def _unresolved(policy: Policy, exc: TencentError) -> str:
    if scheduler.refuses_region(exc):
        return f"plan: {scheduler.region_problem(policy, exc)}"
    return f"plan: cannot resolve the targets of {policy.name!r}: {exc.code}: {exc.message}"


# -- the readable table -----------------------------------------------------------------------


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _dry_run_cell(target: Target) -> str:
    d = target.dry_run
    if d.ok and d.code == DRY_RUN_OK:
        return "ok"
    return f"{'ok' if d.ok else 'FAILED'}: {d.code}: {d.message}"


def _targets_section(plan: Plan) -> list[str]:
    present = sum(t.exists for t in plan.targets)
    missing = len(plan.targets) - present
    lines = [f"Instances: {present} to back up, {missing} missing"]
    if not plan.targets:
        return [*lines, f"  (no targets: {plan.no_targets or 'no instance matches the policy'})"]
    rows = [("INSTANCE", "EXISTS", "DRY RUN")]
    rows += [(t.instance_id, "yes" if t.exists else "no", _dry_run_cell(t)) for t in plan.targets]
    return lines + ["  " + line for line in _columns(rows)]


def _retention_section(plan: Plan) -> list[str]:
    header = (
        f"Retention (assuming every backup succeeds): {len(plan.deletions)} of "
        f"{len(plan.images)} images would be deleted"
    )
    lines = [header]
    if plan.untargeted_images:
        lines.append(f"  {plan.untargeted_images} image(s) of instances not targeted: left alone")
    if not plan.images:
        return lines
    rows = [("INSTANCE", "IMAGE", "STATE", "CREATED", "ACTION", "WHY")]
    for i in plan.images:
        created = i.created.astimezone(UTC).strftime("%Y-%m-%d %H:%MZ")
        rows.append((i.instance_id, i.image_id, i.state, created, i.action, "; ".join(i.reasons)))
    return lines + ["  " + line for line in _columns(rows)]


def _copy_rules(copy: CopyTarget) -> dict[str, int]:
    (raw,) = copies_raw([copy])
    return {k: v for k, v in raw.items() if k != "region"}


def _copies_section(plan: Plan) -> list[str]:
    """One line per destination: how many copies a run makes there, kept by which rules."""
    if not plan.copies:
        return []
    count = sum(t.exists for t in plan.targets)
    lines = ["Copies (made once each backup is NORMAL):"]
    for copy in plan.copies:
        rules = ", ".join(f"{k} {v}" for k, v in _copy_rules(copy).items() if v)
        lines.append(f"  {count} to {copy.region}, kept there by {rules}")
    return [*lines, ""]


def render(plan: Plan) -> str:
    """The plan as a readable report."""
    state = "enabled" if plan.enabled else "DISABLED"
    head = (
        f"Plan for policy {plan.policy} ({state}; account {plan.account}, region {plan.region}),"
        f" a run now: slot {plan.slot.isoformat()}"
    )
    verdict = "All DryRuns ok." if plan.ok else "Some DryRuns FAILED: a run would not succeed."
    body = [head, "", *_targets_section(plan), "", *_copies_section(plan)]
    body += [*_retention_section(plan), "", verdict]
    return "\n".join(body)
