"""CreateImage, with the business rules a backup daemon runs into."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.simulator.apierror import ApiError, missing
from orchestrator.simulator.context import CallContext, Json
from orchestrator.simulator.params import Params
from orchestrator.simulator.records import InstanceRecord, SimImage, iso
from orchestrator.simulator.render import system_disk_id

MAX_NAME = 60
MAX_DESCRIPTION = 256
PARAMS = frozenset(
    {
        "ImageName",
        "InstanceId",
        "ImageDescription",
        "ForcePoweroff",
        "Sysprep",
        "DataDiskIds",
        "SnapshotIds",
        "DryRun",
        "TagSpecification",
        "ImageFamily",
    }
)
IMAGEABLE = frozenset({"RUNNING", "STOPPED"})
# Instance states that refuse imaging, and the code each one answers.
_STATE_CODES = {
    "TERMINATING": "Terminating",
    "REBOOTING": "Rebooting",
    "STARTING": "Starting",
    "STOPPING": "Stopping",
    "ENTER_RESCUE_MODE": "EnterRescueMode",
    "RESCUE_MODE": "RescueMode",
    "EXIT_RESCUE_MODE": "ExitRescueMode",
    "ENTER_SERVICE_LIVE_MIGRATE": "EnterServiceLiveMigrate",
    "SERVICE_LIVE_MIGRATE": "ServiceLiveMigrate",
    "EXIT_SERVICE_LIVE_MIGRATE": "ServiceLiveMigrate",
    "FREEZING": "Freezing",
}


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """A validated CreateImage request."""

    name: str
    instance_id: str
    description: str
    force_poweroff: str | None
    sysprep: str | None
    data_disk_ids: tuple[str, ...]
    tags: dict[str, str]
    dry_run: bool


def _name(params: Params) -> str:
    name = params.text("ImageName", required=True) or ""
    if not name:
        raise missing("ImageName")
    if len(name) > MAX_NAME:
        raise ApiError(
            "InvalidParameter.ValueTooLarge",
            f"The length of `ImageName` exceeds the limit of {MAX_NAME} characters.",
        )
    return name


def _instance_id(params: Params) -> str:
    if params.has("SnapshotIds"):
        if params.has("InstanceId"):
            raise ApiError(
                "InvalidParameter.SpecifyOneParameter", "Give InstanceId or SnapshotIds, not both."
            )
        raise ApiError(
            "InvalidParameter.SnapshotNotFound", "The simulator makes images from instances only."
        )
    instance_id = params.text("InstanceId")
    if not instance_id:
        raise missing("InstanceId")
    return instance_id


def _description(params: Params) -> str:
    description = params.text("ImageDescription") or ""
    if len(description) > MAX_DESCRIPTION:
        raise ApiError(
            "InvalidParameter.ValueTooLarge",
            f"The length of `ImageDescription` exceeds the limit of {MAX_DESCRIPTION}.",
        )
    return description


def read_request(body: Json) -> CreateRequest:
    """Validate the parameters of a CreateImage call."""
    params = Params(body, PARAMS)
    return CreateRequest(
        name=_name(params),
        instance_id=_instance_id(params),
        description=_description(params),
        force_poweroff=params.bool_text("ForcePoweroff"),
        sysprep=params.bool_text("Sysprep"),
        data_disk_ids=tuple(params.texts("DataDiskIds")),
        tags=params.tag_specification(),
        dry_run=params.flag("DryRun"),
    )


def _check_instance(ctx: CallContext, instance_id: str) -> InstanceRecord:
    record = ctx.state.instance(ctx.account, ctx.region, instance_id)
    if record is None:
        raise ApiError("InvalidInstanceId.NotFound", f"The instance `{instance_id}` is not found.")
    return record


def _check_name(ctx: CallContext, name: str) -> None:
    if ctx.state.image_named(ctx.account, ctx.region, name) is not None:
        raise ApiError("InvalidImageName.Duplicate", f"The image name `{name}` already exists.")


def _check_state(record: InstanceRecord) -> None:
    if record.state in IMAGEABLE:
        return
    suffix = _STATE_CODES.get(record.state)
    code = (
        f"UnsupportedOperation.InstanceState{suffix}" if suffix else "InvalidInstance.NotSupported"
    )
    raise ApiError(code, f"The instance is {record.state} and cannot be imaged now.")


def _check_busy(ctx: CallContext, record: InstanceRecord) -> None:
    instance_id = record.spec.instance_id
    if record.creating is not None:
        raise ApiError(
            "MutexOperation.TaskRunning",
            f"An image of the instance `{instance_id}` is being created; retry later.",
        )
    if record.busy_until > ctx.state.mono():
        raise ApiError(
            "OperationDenied.InstanceOperationInProgress",
            f"The instance `{instance_id}` is busy with another operation; retry later.",
        )


def _check_disks(record: InstanceRecord, disk_ids: tuple[str, ...]) -> None:
    if system_disk_id(record) in disk_ids:
        raise ApiError(
            "InvalidParameter.DataDiskIdContainsRootDisk",
            "DataDiskIds must not contain the system disk.",
        )
    local = [d for d in disk_ids if d in record.spec.local_data_disk_ids]
    if local:
        raise ApiError(
            "InvalidParameter.LocalDataDiskNotSupport",
            f"The data disk `{local[0]}` is a local disk; images cannot include local disks.",
        )
    foreign = [d for d in disk_ids if d not in record.spec.data_disk_ids]
    if foreign:
        raise ApiError(
            "InvalidParameter.DataDiskNotBelongSpecifiedInstance",
            f"The data disk `{foreign[0]}` does not belong to the instance.",
        )


def _check_quota(ctx: CallContext) -> None:
    quota = ctx.state.quota_of(ctx.region)
    if len(ctx.state.live_images(ctx.account, ctx.region)) >= quota:
        raise ApiError(
            "ImageQuotaLimitExceeded",
            f"The number of custom images has reached the quota `{quota}` of this region.",
        )


def validate(ctx: CallContext, request: CreateRequest) -> InstanceRecord:
    """Every business check, in the order the daemon should expect them."""
    record = _check_instance(ctx, request.instance_id)
    _check_name(ctx, request.name)
    _check_state(record)
    _check_busy(ctx, record)
    _check_disks(record, request.data_disk_ids)
    _check_quota(ctx)
    return record


def _make(ctx: CallContext, request: CreateRequest, record: InstanceRecord) -> SimImage:
    state = ctx.state
    image = SimImage(
        image_id=state.new_image_id(),
        name=request.name,
        account=ctx.account,
        region=ctx.region,
        state="CREATING",
        created_time=iso(state.now()),
        instance_id=request.instance_id,
        tags=request.tags,
        description=request.description,
        force_poweroff=request.force_poweroff,
        sysprep=request.sysprep,
        data_disk_ids=request.data_disk_ids,
        legacy=state.legacy or record.spec.behaviour == "legacy",
        final_state="CREATEFAILED" if record.spec.behaviour == "fail" else "NORMAL",
    )
    state.add_image(image, delay=state.draw_delay(), lag=state.config.list_lag)
    record.creating = image.image_id
    return image


def create_image(ctx: CallContext, body: Json) -> Json:
    """CreateImage: validate, then start an image that becomes NORMAL (or CREATEFAILED)."""
    request = read_request(body)
    record = validate(ctx, request)
    if request.dry_run:
        raise ApiError("DryRunOperation", "Request would have succeeded, but DryRun flag is set.")
    image = _make(ctx, request, record)
    # The older API answered with the RequestId only (docs/design.md#the-older-createimage-answer).
    return {} if image.legacy else {"ImageId": image.image_id}
