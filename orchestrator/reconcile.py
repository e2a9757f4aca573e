"""Reconciliation: the `images` table rebuilt and kept true from what the cloud lists.

The table is the authority on which images are ours (docs/design.md#invariants, 3), so a lost
database would orphan every image: retention would never delete them and quota rotation never evict
them. Reconciliation lists the private images of every (account, region) our policies or image rows
use and, per region:

- adopts an image the table does not know when its tags prove this deployment made it under a
  policy that exists (by name) and its name and description give the instance and slot
  (`naming.origin`): a row with no job and the listed state, and an `image.adopted_by_reconcile`
  event;
- marks a row whose image is no longer listed as deleted outside (`gone_outside`, with an
  `image.gone_outside` event), so a vanished image stops counting as an instance's newest good one.
  Not listed is "not yet" for a new image (docs/design.md#listing-lag), so only rows older than a
  margin and past CREATING qualify, each confirmed absent by id as well; a row with a deletion in
  flight belongs to the rotation and is never touched;
- refreshes the state of NORMAL rows (and of rows without a job, which no tracker follows) from
  the listing: NORMAL -> CREATEFAILED, or DELETING when someone else is deleting it;
- leaves alone look-alikes: our name pattern or our tag keys without this deployment's proof,
  images of a policy this database does not have, and names that do not match their description.

Writes happen under rotation's region lock, so a rotation or sweep never decides from a picture
half-way through a reconciliation. A dry run computes the same findings and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from orchestrator import logs, naming, rotation
from orchestrator.context import EngineContext
from orchestrator.db.resilience import DbWatch
from orchestrator.rotation import Conn, LiveImage
from orchestrator.tencent.errors import TencentError
from orchestrator.tencent.models import Filter, Image

log = logs.get("reconcile")

# A row younger than this may simply not be listed yet (listing lag): never marked gone.
GONE_MARGIN = 600.0
GONE_REASON = "gone_outside"
DELETING = "DELETING"
PRIVATE = (Filter("image-type", ("PRIVATE_IMAGE",)),)

ADOPTED = "adopted"
GONE = "gone"
REFRESHED = "refreshed"
LEFT_ALONE = "left alone"

# Every (account, region) with a policy, a copy destination or a live image row: where our
# images can be. Policies' own regions first: a copy is adopted only beside its adopted source.
_TARGETS = """
SELECT account, region, min(rank) AS rank FROM (
    SELECT account, region, 0 AS rank FROM policies
    UNION ALL SELECT p.account, d.region, 1 FROM policies p,
        jsonb_to_recordset(p.copies) AS d(region text) WHERE d.region IS NOT NULL
    UNION ALL SELECT account, region, 1 FROM images WHERE deleted_at IS NULL
) t GROUP BY account, region
ORDER BY rank, account, region
"""

# Backups of ours (by exact name) whose policy copies to the region: what an untagged image of
# that name there is a copy of. SyncImages keeps the source's name and, as far as anything
# documents, none of its tags: the name of a backup whose tags proved it ours is the proof.
_COPY_SOURCES = """
SELECT i.name, i.image_id, i.policy_id, i.instance_id, i.slot, p.name AS policy
FROM images i JOIN policies p ON p.id = i.policy_id
WHERE i.account = $1 AND i.source_image_id IS NULL AND i.name = ANY($3::text[])
  AND i.region <> $2
  AND p.copies @> jsonb_build_array(jsonb_build_object('region', $2::text))
"""

# The region's live rows, with whether each is old enough for "not listed" to mean "gone".
_ROWS = """
SELECT i.image_id, i.name, i.account, i.region, i.policy_id, i.instance_id, i.job_id, i.state,
       i.created_at, i.delete_requested_at, i.delete_reason, p.name AS policy,
       i.created_at < now() - $3::float8 * interval '1 second' AS settled
FROM images i JOIN policies p ON p.id = i.policy_id
WHERE i.account = $1 AND i.region = $2 AND i.deleted_at IS NULL
"""

# Rows of listed images, deleted ones included: an image we already deleted is not adopted.
_KNOWN = "SELECT image_id, deleted_at, delete_reason FROM images WHERE image_id = ANY($1::text[])"

_POLICIES = "SELECT name, id FROM policies"

# Names a live job is still making: its own tracker records the image, not us.
_MAKING = """
SELECT image_name FROM jobs WHERE account = $1 AND region = $2 AND finished_at IS NULL
"""

_ADOPT = """
INSERT INTO images (image_id, name, account, region, instance_id, policy_id, slot, job_id,
                    state, size_gb, created_at, ready_at, source_image_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, $8::text, $9, $10::timestamptz,
        CASE WHEN $8::text = 'NORMAL' THEN $10::timestamptz END, $11)
ON CONFLICT (image_id) DO NOTHING
RETURNING image_id
"""

# Conditional: a deletion requested since the listing (the rotation's) wins, and so does a row
# that became young or CREATING again in our eyes (it cannot, but the check is free).
_GONE = """
UPDATE images SET delete_requested_at = now(), delete_reason = $2, deleted_at = now()
WHERE image_id = $1 AND deleted_at IS NULL AND delete_requested_at IS NULL
  AND state <> 'CREATING'
RETURNING image_id
"""

_REFRESH = """
UPDATE images SET state = $3
WHERE image_id = $1 AND state = $2 AND deleted_at IS NULL AND delete_requested_at IS NULL
RETURNING image_id
"""


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing reconciliation did (or, in a dry run, would do) about one image."""

    action: str  # adopted | gone | refreshed | left alone
    account: str
    region: str
    image_id: str
    name: str
    state: str
    policy: str | None
    instance_id: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Change:
    """A write reconciliation makes: the finding it reports, and the row it writes."""

    finding: Finding
    image: LiveImage
    listed: Image | None = None
    slot: datetime | None = None
    old_state: str = ""


@dataclass
class Report:
    """A whole reconciliation: its findings and the regions it could not look at."""

    dry_run: bool
    findings: list[Finding] = field(default_factory=list)
    regions: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # account, region, why

    def count(self, action: str) -> int:
        """How many findings of one action."""
        return sum(1 for f in self.findings if f.action == action)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "dry_run": self.dry_run,
            "regions": [{"account": a, "region": r} for a, r in self.regions],
            "skipped": [{"account": a, "region": r, "reason": w} for a, r, w in self.skipped],
            "findings": [f.to_json() for f in self.findings],
        }


@dataclass(frozen=True, slots=True)
class Picture:
    """What one region looks like to reconciliation: the listing and our table."""

    account: str
    region: str
    listed: Mapping[str, Image]
    rows: Sequence[Any]
    known: Mapping[str, Any]
    policies: Mapping[str, int]
    making: frozenset[str]
    deployment: str
    # Backups of ours by name whose policy copies here (see _COPY_SOURCES).
    sources: Mapping[str, Any] = field(default_factory=dict)


# -- the pass ---------------------------------------------------------------------------------


async def reconcile(
    ctx: EngineContext,
    accounts: Collection[str],
    *,
    dry_run: bool = False,
    margin: float = GONE_MARGIN,
) -> Report:
    """Reconcile every region of `accounts` that a policy or a live image row uses."""
    report = Report(dry_run)
    for row in await ctx.pool.fetch(_TARGETS):
        account, region = row["account"], row["region"]
        if account not in ctx.clients:
            why = f"account {account!r} is not configured ([[accounts]])"
            log.warning("reconcile.skipped", account=account, region=region, reason=why)
            report.skipped.append((account, region, why))
        elif account in accounts:
            await _one_region(ctx, report, account, region, margin=margin)
    _log_done(report)
    return report


async def _one_region(
    ctx: EngineContext, report: Report, account: str, region: str, *, margin: float
) -> None:
    try:
        found = await reconcile_region(ctx, account, region, dry_run=report.dry_run, margin=margin)
    except TencentError as exc:
        # Cannot list the region now (denied, unreachable): the others go on, this one waits.
        why = f"{exc.code}: {exc.message}"
        log.warning("reconcile.skipped", account=account, region=region, reason=why)
        report.skipped.append((account, region, why))
        return
    report.regions.append((account, region))
    report.findings += found


async def run(
    ctx: EngineContext, stop: asyncio.Event, driven: Callable[[], Collection[str]]
) -> None:
    """Reconcile at once, then every `reconcile_interval`, until `stop`."""
    watch = DbWatch("reconcile", stop)
    while not stop.is_set():
        async with watch:
            await reconcile(ctx, driven())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=ctx.settings.reconcile_interval)


def _log_done(report: Report) -> None:
    counts = {a.replace(" ", "_"): report.count(a) for a in (ADOPTED, GONE, REFRESHED, LEFT_ALONE)}
    changed = counts[ADOPTED] + counts[GONE] + counts[REFRESHED]
    level = log.info if changed or report.skipped else log.debug
    level("reconcile.done", dry_run=report.dry_run, regions=len(report.regions), **counts)


async def reconcile_region(
    ctx: EngineContext, account: str, region: str, *, dry_run: bool, margin: float
) -> list[Finding]:
    """Reconcile one (account, region); the findings, written unless `dry_run`."""
    client = ctx.client(account)
    listed = {i.image_id: i async for i in client.iter_images(region, filters=PRIVATE)}
    deployment = ctx.settings.deployment
    picture = await _picture(
        ctx.pool, account, region, listed, deployment=deployment, margin=margin
    )
    changes = _adoptions(picture) + _refreshes(picture)
    changes += await _confirmed_gone(ctx, picture)
    if not dry_run:
        async with rotation.region_lock(ctx, account, region) as conn:
            changes = [c for c in changes if await _write(conn, c)]
    return _left_alone(picture) + [c.finding for c in changes]


async def _picture(
    conn: Conn,
    account: str,
    region: str,
    listed: Mapping[str, Image],
    *,
    deployment: str,
    margin: float,
) -> Picture:
    rows = await conn.fetch(_ROWS, account, region, margin)
    known = {r["image_id"]: r for r in await conn.fetch(_KNOWN, list(listed))}
    policies = {r["name"]: r["id"] for r in await conn.fetch(_POLICIES)}
    making = await conn.fetch(_MAKING, account, region)
    names = frozenset(r["image_name"] for r in making)
    untagged = [i.name for i in listed.values() if not i.tags and i.image_id not in known]
    sources = {r["name"]: r for r in await conn.fetch(_COPY_SOURCES, account, region, untagged)}
    return Picture(account, region, listed, rows, known, policies, names, deployment, sources)


# -- what to do -------------------------------------------------------------------------------


def _finding(p: Picture, action: str, image: Image, reason: str, **about: Any) -> Finding:
    return Finding(
        action=action,
        account=p.account,
        region=p.region,
        image_id=image.image_id,
        name=image.name,
        state=image.state,
        policy=about.get("policy", naming.policy_of(image.tags)),
        instance_id=about.get("instance_id"),
        reason=reason,
    )


def _looks_like_ours(image: Image) -> bool:
    keys = {t.key for t in image.tags}
    return image.name.startswith(f"{naming.PREFIX}-") or bool(
        keys & {naming.TAG_DEPLOYMENT, naming.TAG_POLICY}
    )


def why_not_adopted(p: Picture, image: Image) -> str | None:
    """Why an unknown listed image is not adopted; None when it is provably ours to adopt."""
    unproven = None if _copy_source(p, image) is not None else _why_not_tagged(p, image)
    if unproven is not None:
        return unproven
    if image.state == DELETING:
        return "being deleted"
    if image.name in p.making:
        return "a job is still making it"
    return None


def _copy_source(p: Picture, image: Image) -> Any | None:
    """Our backup `image` is a copy of: untagged, with that backup's exact name."""
    return p.sources.get(image.name) if not image.tags else None


def _why_not_tagged(p: Picture, image: Image) -> str | None:
    """Why the tags, name and description do not prove a backup ours; None when they do."""
    policy = naming.policy_of(image.tags)
    made = naming.origin(image.name, image.description)
    if not naming.is_ours(image.tags, p.deployment):
        tagged = image.tag(naming.TAG_DEPLOYMENT)
        return f"not this deployment's (cvm-backup:deployment={tagged or 'missing'})"
    if policy not in p.policies:
        return f"unknown policy {policy!r}"
    if made is None or made.policy != policy:
        return "name and description do not give this policy's instance and slot"
    return None


def _unknown(p: Picture) -> list[Image]:
    """Listed images the table has no row for that look like ours (by name or tag keys)."""
    return [i for i in p.listed.values() if i.image_id not in p.known and _looks_like_ours(i)]


def _adoptions(p: Picture) -> list[Change]:
    return [_adoption(p, i) for i in _unknown(p) if why_not_adopted(p, i) is None]


def _adoption(p: Picture, image: Image) -> Change:
    source = _copy_source(p, image)
    if source is not None:
        return _copy_adoption(p, image, source)
    made = naming.origin(image.name, image.description)
    assert made is not None  # checked by why_not_adopted
    live = LiveImage(
        image_id=image.image_id,
        account=p.account,
        region=p.region,
        policy_id=p.policies[made.policy],
        instance_id=made.instance_id,
        job_id=None,
        state=image.state,
        created_at=image.created_time or made.slot,
        delete_requested_at=None,
        delete_reason=None,
    )
    reason = "this deployment's tags; not in the database"
    about = {"policy": made.policy, "instance_id": made.instance_id}
    finding = _finding(p, ADOPTED, image, reason, **about)
    return Change(finding, live, listed=image, slot=made.slot)


def _copy_adoption(p: Picture, image: Image, source: Any) -> Change:
    live = LiveImage(
        image_id=image.image_id,
        account=p.account,
        region=p.region,
        policy_id=source["policy_id"],
        instance_id=source["instance_id"],
        job_id=None,
        state=image.state,
        created_at=image.created_time or source["slot"],
        delete_requested_at=None,
        delete_reason=None,
        source_image_id=source["image_id"],
    )
    reason = f"a copy of our backup {source['image_id']} (its exact name); not in the database"
    about = {"policy": source["policy"], "instance_id": source["instance_id"]}
    finding = _finding(p, ADOPTED, image, reason, **about)
    return Change(finding, live, listed=image, slot=source["slot"])


def _left_alone(p: Picture) -> list[Finding]:
    found = []
    for image in _unknown(p):
        if (why := why_not_adopted(p, image)) is not None:
            found.append(_finding(p, LEFT_ALONE, image, why))
    for image_id, row in p.known.items():
        image = p.listed[image_id]
        # Ours, deleted in our books yet listed and not DELETING: say so, never re-adopt.
        if row["deleted_at"] is not None and image.state != DELETING:
            why = f"recorded as deleted ({row['delete_reason']}) but still listed"
            found.append(_finding(p, LEFT_ALONE, image, why))
    return found


def _owned_by_us(row: Any) -> bool:
    """Whether reconciliation may write the row: no deletion of ours is in flight."""
    return row["delete_requested_at"] is None


def _refreshes(p: Picture) -> list[Change]:
    changes = []
    for row in p.rows:
        image = p.listed.get(row["image_id"])
        if image is None or image.state == row["state"] or not _owned_by_us(row):
            continue
        # A job's tracker follows its CREATING image; NORMAL rows and jobless rows are ours.
        if row["state"] == "NORMAL" or row["job_id"] is None:
            reason = f"listed {image.state}, recorded {row['state']}"
            finding = _finding(p, REFRESHED, image, reason, **_about(row))
            changes.append(Change(finding, LiveImage.from_record(row), old_state=row["state"]))
    return changes


def _about(row: Any) -> dict[str, Any]:
    return {"policy": row["policy"], "instance_id": row["instance_id"]}


def _gone_candidates(p: Picture) -> list[Any]:
    """Rows not listed, past CREATING and the listing-lag margin, with no deletion in flight."""
    return [
        row
        for row in p.rows
        if row["image_id"] not in p.listed
        and _owned_by_us(row)
        and row["settled"]
        and row["state"] != "CREATING"
    ]


async def _confirmed_gone(ctx: EngineContext, p: Picture) -> list[Change]:
    candidates = _gone_candidates(p)
    if not candidates:
        return []
    # A second look, by id: a listing that missed an image must not make it gone.
    ids = [r["image_id"] for r in candidates]
    present = {i.image_id for i in await ctx.client(p.account).images_by_ids(p.region, ids)}
    return [_gone(p, row) for row in candidates if row["image_id"] not in present]


def _gone(p: Picture, row: Any) -> Change:
    finding = Finding(
        action=GONE,
        account=p.account,
        region=p.region,
        image_id=row["image_id"],
        name=row["name"],
        state=row["state"],
        policy=row["policy"],
        instance_id=row["instance_id"],
        reason="no longer listed: deleted outside cvm-backup",
    )
    return Change(finding, LiveImage.from_record(row))


# -- writing ----------------------------------------------------------------------------------


async def _write(conn: Conn, change: Change) -> bool:
    """Write one change in its own transaction; False when the row moved on meanwhile."""
    write = _WRITERS[change.finding.action]
    async with conn.transaction():
        done = await write(conn, change)
    if done:
        _log_change(change.finding)
    return done


async def _write_adoption(conn: Conn, change: Change) -> bool:
    image, listed = change.image, change.listed
    assert listed is not None
    row = await conn.fetchrow(
        _ADOPT,
        image.image_id,
        listed.name,
        image.account,
        image.region,
        image.instance_id,
        image.policy_id,
        change.slot,
        image.state,
        listed.size_gib,
        image.created_at,
        image.source_image_id,
    )
    if row is None:
        return False
    details = {"name": listed.name, "state": image.state, "slot": change.slot}
    await rotation.record_event(conn, "image.adopted_by_reconcile", image, None, **details)
    return True


async def _write_gone(conn: Conn, change: Change) -> bool:
    image = change.image
    if await conn.fetchrow(_GONE, image.image_id, GONE_REASON) is None:
        return False
    details = {"state": image.state, "created_at": image.created_at}
    await rotation.record_event(conn, "image.gone_outside", image, GONE_REASON, **details)
    return True


async def _write_refresh(conn: Conn, change: Change) -> bool:
    image, new = change.image, change.finding.state
    if await conn.fetchrow(_REFRESH, image.image_id, change.old_state, new) is None:
        return False
    details = {"from": change.old_state, "to": new}
    await rotation.record_event(conn, "image.state_refreshed", image, "reconcile", **details)
    return True


_WRITERS = {ADOPTED: _write_adoption, GONE: _write_gone, REFRESHED: _write_refresh}


def _log_change(f: Finding) -> None:
    event = {ADOPTED: "reconcile.adopted", GONE: "reconcile.gone_outside"}.get(
        f.action, "reconcile.refreshed"
    )
    log.info(
        event,
        image_id=f.image_id,
        account=f.account,
        region=f.region,
        policy=f.policy,
        instance_id=f.instance_id,
        state=f.state,
        reason=f.reason,
    )


def by_action(findings: Iterable[Finding]) -> dict[str, list[Finding]]:
    """Findings grouped by action, in table order (adopted, gone, refreshed, left alone)."""
    order = (ADOPTED, GONE, REFRESHED, LEFT_ALONE)
    grouped: dict[str, list[Finding]] = {a: [] for a in order}
    for f in findings:
        grouped[f.action].append(f)
    return grouped


def now() -> datetime:
    """The reconciliation's clock (UTC)."""
    return datetime.now(UTC)
