"""DescribeInstances."""

from __future__ import annotations

from orchestrator.simulator.apierror import ApiError
from orchestrator.simulator.context import CallContext, Json
from orchestrator.simulator.filters import instance_filter
from orchestrator.simulator.images import page_bounds
from orchestrator.simulator.params import Params
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
        keep = instance_filter(params.filters())
        found = [r for r in ctx.state.visible_instances(ctx.account, ctx.region) if keep(r)]
    return {
        "TotalCount": len(found),
        "InstanceSet": [instance_json(r) for r in found[offset : offset + limit]],
    }
