"""SyncImages: copy a custom image to other regions (docs/design.md#syncimages).

What the real API documents, and the simulator does: one NORMAL custom image per call
(`InvalidImageId.IncorrectState` otherwise), destinations that are known regions and not the
source's own (`InvalidRegion.NotFound`, `InvalidParameterValue.InvalidRegion`), some regions not
offered (`UnsupportedOperation.Region`, for `sync_unsupported_regions`; the real API may say
`InvalidRegion.Unavailable`, "this region does not support syncing yet", and the client classes
both as permanent for that destination), a name of at most 60
characters defaulting to the source's, the destination's custom-image quota
(`ImageQuotaLimitExceeded`; a copy counts from the call on, SYNCING or not), DryRun, and
`ImageSet` (one `{ImageId, Region}` per destination) when `ImageSetRequired` is true. No client
token: calling again makes another copy unless the name check below refuses it.

What the real API leaves open, and the simulator decides (each a SimConfig option):
- `InvalidImageName.Duplicate` when the destination already has an image of the copy's name:
  unknown for SyncImages (`sync_checks_names`, on by default: the stricter case for a caller).
- Whether tags travel with the copy: undocumented (`sync_copies_tags`, off: no tags). The
  simulator has no tag-editing action, so DescribeImages tag filters see only the tags an image
  got when it was made; an untagged copy is found by name or id, never by tag.
- Whether the source may be deleted while it syncs: DeleteImages refuses images that are being
  copied (`source_busy_while_syncing`, on: `InvalidImageId.IncorrectState`). The source itself
  stays NORMAL in listings; the real source's state during a sync is not confirmed.
- More than one image id, more than MAX_DESTINATIONS destinations, and `Encrypt` are refused:
  the simulator's own bounds, with codes from SyncImages' published list.
Every simulated image is a custom image of the calling account, so "custom images only" holds
by construction; copies are made in state SYNCING and become NORMAL after `sync_delay`.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.simulator.apierror import ApiError, missing
from orchestrator.simulator.context import CallContext, Json
from orchestrator.simulator.create_image import MAX_NAME
from orchestrator.simulator.images import image_ids
from orchestrator.simulator.params import Params
from orchestrator.simulator.records import SYNCING, SimImage, iso

PARAMS = frozenset(
    {
        "ImageIds",
        "DestinationRegions",
        "DryRun",
        "ImageName",
        "ImageSetRequired",
        "Encrypt",
        "KmsKeyId",
    }
)
# The simulator's bound on one call (the API publishes none); above every region Tencent has.
MAX_DESTINATIONS = 30
SYNCABLE = "NORMAL"


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """A validated SyncImages request."""

    image_id: str
    destinations: tuple[str, ...]
    name: str | None
    image_set: bool
    dry_run: bool


def _image_id(params: Params) -> str:
    ids = image_ids(params)
    if not ids:
        raise missing("ImageIds")
    if len(ids) > 1:
        raise ApiError(
            "InvalidParameterValue.LimitExceeded", "SyncImages copies one image per call."
        )
    return ids[0]


def _destinations(params: Params) -> tuple[str, ...]:
    regions = tuple(dict.fromkeys(params.texts("DestinationRegions")))
    if not regions:
        raise missing("DestinationRegions")
    if len(regions) > MAX_DESTINATIONS:
        raise ApiError(
            "InvalidParameterValue.LimitExceeded",
            f"At most {MAX_DESTINATIONS} destination regions per call.",
        )
    return regions


def _name(params: Params) -> str | None:
    name = params.text("ImageName")
    if name is not None and not name:
        raise ApiError("InvalidParameterValue", "`ImageName` must not be empty.")
    if name is not None and len(name) > MAX_NAME:
        raise ApiError(
            "InvalidParameter.ValueTooLarge",
            f"The length of `ImageName` exceeds the limit of {MAX_NAME} characters.",
        )
    return name


def read_request(body: Json) -> SyncRequest:
    """Validate the parameters of a SyncImages call."""
    params = Params(body, PARAMS)
    if params.flag("Encrypt"):
        raise ApiError(
            "UnsupportedOperation.SyncEncryptImageNotSupport",
            "The simulator makes no encrypted copies.",
        )
    params.text("KmsKeyId")
    return SyncRequest(
        image_id=_image_id(params),
        destinations=_destinations(params),
        name=_name(params),
        image_set=params.flag("ImageSetRequired"),
        dry_run=params.flag("DryRun"),
    )


def _source(ctx: CallContext, image_id: str) -> SimImage:
    image = ctx.state.live_images(ctx.account, ctx.region).get(image_id)
    if image is None:
        raise ApiError("InvalidImageId.NotFound", f"The image `{image_id}` is not found.")
    if image.state != SYNCABLE:
        raise ApiError(
            "InvalidImageId.IncorrectState",
            f"The image `{image_id}` is {image.state}; only a NORMAL image can be synced.",
        )
    return image


def _check_region(ctx: CallContext, region: str) -> None:
    if region == ctx.region:
        raise ApiError(
            "InvalidParameterValue.InvalidRegion",
            f"A custom image cannot be synced to its own region `{region}`.",
        )
    if not ctx.state.regions.serves(region):
        raise ApiError("InvalidRegion.NotFound", f"The region `{region}` is not found.")
    if region in ctx.state.config.sync_unsupported_regions:
        raise ApiError("UnsupportedOperation.Region", f"Images cannot be synced to `{region}` yet.")


def _check_room(ctx: CallContext, region: str, name: str) -> None:
    state = ctx.state
    if state.config.sync_checks_names and state.image_named(ctx.account, region, name):
        raise ApiError(
            "InvalidImageName.Duplicate",
            f"The image name `{name}` already exists in `{region}`.",
        )
    quota = state.quota_of(region)
    if len(state.live_images(ctx.account, region)) >= quota:
        raise ApiError(
            "ImageQuotaLimitExceeded",
            f"The number of custom images has reached the quota `{quota}` of `{region}`.",
        )


def validate(ctx: CallContext, request: SyncRequest) -> SimImage:
    """Every business check: the source, then each destination, all before any copy."""
    source = _source(ctx, request.image_id)
    name = request.name or source.name
    for region in request.destinations:
        _check_region(ctx, region)
    for region in request.destinations:
        _check_room(ctx, region, name)
    return source


def _copy(ctx: CallContext, source: SimImage, region: str, name: str) -> SimImage:
    state = ctx.state
    copy = SimImage(
        image_id=state.new_image_id(),
        name=name,
        account=ctx.account,
        region=region,
        state=SYNCING,
        created_time=iso(state.now()),
        instance_id=source.instance_id,
        tags=dict(source.tags) if state.config.sync_copies_tags else {},
        description=source.description,
        data_disk_ids=source.data_disk_ids,
    )
    state.start_sync(source, copy, state.draw_sync_delay())
    return copy


def sync_images(ctx: CallContext, body: Json) -> Json:
    """SyncImages: validate, then start one SYNCING copy per destination."""
    request = read_request(body)
    source = validate(ctx, request)
    if request.dry_run:
        raise ApiError("DryRunOperation", "Request would have succeeded, but DryRun flag is set.")
    name = request.name or source.name
    copies = [_copy(ctx, source, region, name) for region in request.destinations]
    if not request.image_set or not ctx.state.config.sync_image_set:
        # Without ImageSetRequired the real answer carries an empty list; an older API none.
        return {"ImageSet": []} if ctx.state.config.sync_image_set else {}
    return {"ImageSet": [{"ImageId": c.image_id, "Region": c.region} for c in copies]}
