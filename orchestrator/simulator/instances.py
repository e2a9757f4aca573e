"""DescribeInstances."""

from __future__ import annotations

from orchestrator.simulator.apierror import ApiError
from orchestrator.simulator.context import CallContext, Json
from orchestrator.simulator.filters import instance_filter
from orchestrator.simulator.images import page_bounds
from orchestrator.simulator.params import Filters, Params
from orchestrator.simulator.records import InstanceRecord
from orchestrator.simulator.render import instance_json

MAX_IDS = 100


def _by_ids(ctx: CallContext, ids: list[str]) -> list[InstanceRecord]:
    if len(ids) > MAX_IDS:
        raise ApiError(
            "InvalidParameterValue.LimitExceeded", f"At most {MAX_IDS} instance ids per call."
        )
    malformed = [i for i in ids if not i.startswith("ins-")]
    if malformed:
        raise ApiError(
            "InvalidInstanceId.Malformed", f"The instance id `{malformed[0]}` is malformed."
        )
    found = (ctx.state.instance(ctx.account, ctx.region, i) for i in dict.fromkeys(ids))
    return [record for record in found if record is not None]


def _check_tag_keys(ctx: CallContext, filters: Filters) -> None:
    if not ctx.state.config.check_tag_keys:
        return
    for name, _ in filters:
        key = name[4:]
        if name.startswith("tag:") and key and not ctx.state.has_tag_key(ctx.account, key):
            raise ApiError(
                "InvalidParameterValue.TagKeyNotFound", f"The tag key `{key}` is not found."
            )


def describe_instances(ctx: CallContext, body: Json) -> Json:
    """DescribeInstances: the account's instances in the region, by ids or filters."""
    params = Params(body, {"InstanceIds", "Filters", "Offset", "Limit"})
    if params.has("InstanceIds") and params.has("Filters"):
        raise ApiError(
            "InvalidParameterCombination", "InstanceIds and Filters cannot be given together."
        )
    offset, limit = page_bounds(params)
    if params.has("InstanceIds"):
        found = _by_ids(ctx, params.texts("InstanceIds"))
    else:
        filters = params.filters()
        _check_tag_keys(ctx, filters)
        keep = instance_filter(filters)
        found = [r for r in ctx.state.visible_instances(ctx.account, ctx.region) if keep(r)]
    return {
        "TotalCount": len(found),
        "InstanceSet": [instance_json(r) for r in found[offset : offset + limit]],
    }
