"""DescribeImages, DeleteImages and DescribeImageQuota."""

from __future__ import annotations

from orchestrator.simulator.apierror import ApiError, missing
from orchestrator.simulator.context import CallContext, Json
from orchestrator.simulator.filters import image_steps
from orchestrator.simulator.params import Filters, Params
from orchestrator.simulator.records import UNDELETABLE, SimImage
from orchestrator.simulator.render import image_json

MAX_LIMIT = 100
DEFAULT_LIMIT = 20
MAX_IDS = 100
INCORRECT_STATE = "InvalidImageId.IncorrectState"


def page_bounds(params: Params) -> tuple[int, int]:
    """Offset and Limit (default 20, at most 100)."""
    offset = params.integer("Offset", 0)
    limit = params.integer("Limit", DEFAULT_LIMIT)
    if limit > MAX_LIMIT:
        raise ApiError(
            "InvalidParameterValue.LimitExceeded", f"`Limit` must not exceed {MAX_LIMIT}."
        )
    return offset, limit


def image_ids(params: Params) -> list[str]:
    ids = params.texts("ImageIds")
    if len(ids) > MAX_IDS:
        raise ApiError(
            "InvalidParameterValue.LimitExceeded", f"At most {MAX_IDS} image ids per call."
        )
    malformed = [i for i in ids if not i.startswith("img-")]
    if malformed:
        raise ApiError("InvalidImageId.Malformed", f"The image id `{malformed[0]}` is malformed.")
    return ids


def _candidates(ctx: CallContext, filters: Filters) -> list[SimImage]:
    """The images the filters can match, oldest first, narrowed through an index if possible."""
    live = ctx.state.live_images(ctx.account, ctx.region)
    for name, values in filters:
        if name == "image-id":
            return sorted((live[i] for i in set(values) if i in live), key=lambda i: i.seq)
        if name.startswith("tag:"):
            return ctx.state.tagged(ctx.account, ctx.region, name[4:], values)
    return [*live.values()]


def _select(ctx: CallContext, params: Params) -> list[SimImage]:
    if params.has("ImageIds"):
        live = ctx.state.live_images(ctx.account, ctx.region)
        # Unknown ids are simply absent from the answer, as on the real API.
        return [live[i] for i in dict.fromkeys(image_ids(params)) if i in live]
    filters = params.filters()
    steps = image_steps(filters)
    found = _candidates(ctx, filters)
    for step, values in steps:
        found = step(found, values)
    return found[::-1]


def _listed(ctx: CallContext, params: Params) -> list[SimImage]:
    # Images made less than list_lag ago exist (name, quota) but are not listed yet.
    return ctx.state.listed(_select(ctx, params))


def describe_images(ctx: CallContext, body: Json) -> Json:
    """DescribeImages: the account's custom images, newest first, by ids or filters."""
    params = Params(body, {"ImageIds", "Filters", "Offset", "Limit", "InstanceType"})
    if params.has("ImageIds") and params.has("Filters"):
        raise ApiError(
            "InvalidParameter.InvalidParameterCoexistImageIdsFilters",
            "ImageIds and Filters cannot be given together.",
        )
    offset, limit = page_bounds(params)
    found = _listed(ctx, params)
    now = ctx.state.mono()
    return {
        "ImageSet": [image_json(i, now) for i in found[offset : offset + limit]],
        "TotalCount": len(found),
    }


def _deletable(ctx: CallContext, ids: list[str]) -> list[SimImage]:
    live = ctx.state.live_images(ctx.account, ctx.region)
    images = []
    for image_id in dict.fromkeys(ids):
        image = live.get(image_id)
        if image is None:
            raise ApiError("InvalidImageId.NotFound", f"The image `{image_id}` is not found.")
        if image.state in UNDELETABLE:
            raise ApiError(
                INCORRECT_STATE, f"The image `{image_id}` is {image.state} and cannot be deleted."
            )
        if image.syncing and ctx.state.config.source_busy_while_syncing:
            raise ApiError(
                INCORRECT_STATE,
                f"The image `{image_id}` is being synced to another region and cannot be deleted.",
            )
        images.append(image)
    return images


def delete_images(ctx: CallContext, body: Json) -> Json:
    """DeleteImages: all or nothing; refuses images being made, synced from or deleted."""
    params = Params(body, {"ImageIds", "DeleteBindedSnap", "DryRun"})
    ids = image_ids(params)
    if not ids:
        raise missing("ImageIds")
    snap = params.flag("DeleteBindedSnap")
    images = _deletable(ctx, ids)
    if params.flag("DryRun"):
        raise ApiError("DryRunOperation", "Request would have succeeded, but DryRun flag is set.")
    for image in images:
        ctx.state.delete_image(image, delete_binded_snap=snap)
    return {}


def describe_image_quota(ctx: CallContext, body: Json) -> Json:
    """DescribeImageQuota: the region's custom-image quota."""
    Params(body, ())
    return {"ImageNumQuota": ctx.state.quota_of(ctx.region)}
