"""What a simulator run looks like: accounts, limits, fleet, faults and timings.

Everything is a plain frozen dataclass so a configuration can be built in Python by tests,
loaded from a TOML/JSON file (`fleet.py`) or assembled from command-line flags.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Published per-second limits (docs/design.md#rate-limits).
DEFAULT_LIMITS: Mapping[str, int] = {
    "CreateImage": 10,
    "DeleteImages": 10,
    "DescribeImages": 40,
    "DescribeInstances": 40,
    "DescribeImageQuota": 10,
    "SyncImages": 10,
}

# The bound on every simulated delay and latency range, in seconds: a day is already far past
# any test; infinity (TOML `inf`) would leave an image CREATING or SYNCING forever.
MAX_DELAY = 86400.0
DEFAULT_REGION = "ap-guangzhou"
DEFAULT_QUOTA = 500
INSTANCE_STATES = frozenset(
    {
        "PENDING",
        "LAUNCH_FAILED",
        "RUNNING",
        "STOPPED",
        "STARTING",
        "STOPPING",
        "REBOOTING",
        "SHUTDOWN",
        "TERMINATING",
        "ENTER_RESCUE_MODE",
        "RESCUE_MODE",
        "EXIT_RESCUE_MODE",
        "ENTER_SERVICE_LIVE_MIGRATE",
        "SERVICE_LIVE_MIGRATE",
        "EXIT_SERVICE_LIVE_MIGRATE",
        # Not an InstanceStatus value of the docs: how the simulator shows an instance that is
        # frozen (arrears, isolation), which CreateImage refuses with InstanceStateFreezing.
        "FREEZING",
    }
)
CLOUD_DISK_TYPE = "CLOUD_PREMIUM"
LOCAL_DISK_TYPES = frozenset({"LOCAL_BASIC", "LOCAL_SSD"})
BEHAVIOURS = frozenset({"normal", "busy", "fail", "legacy"})


@dataclass(frozen=True, slots=True)
class SimInstance:
    """One CVM instance of the simulated fleet.

    `behaviour`: "busy" answers OperationDenied.InstanceOperationInProgress for `busy_seconds`
    after start (forever when 0), "fail" makes images that end CREATEFAILED, "legacy" answers
    CreateImage without ImageId. `account` None means the instance is visible to every account.
    `data_disk_ids` are cloud disks (CLOUD_PREMIUM); `local_data_disk_ids` (`ldisk-...`) are
    local disks of `local_disk_type`, which DescribeInstances lists but CreateImage refuses.
    """

    instance_id: str
    name: str = ""
    region: str = DEFAULT_REGION
    zone: str = ""
    state: str = "RUNNING"
    tags: Mapping[str, str] = field(default_factory=dict)
    data_disk_ids: tuple[str, ...] = ()
    system_disk_id: str = ""
    os_name: str = "TencentOS Server 3.1 (TK4)"
    created_time: str = "2024-01-01T00:00:00Z"
    behaviour: str = "normal"
    busy_seconds: float = 0.0
    account: str | None = None
    local_data_disk_ids: tuple[str, ...] = ()
    local_disk_type: str = "LOCAL_BASIC"


@dataclass(frozen=True, slots=True)
class SimImageSeed:
    """An image that exists before the simulator starts (not made by the daemon)."""

    image_id: str
    name: str
    region: str = DEFAULT_REGION
    state: str = "NORMAL"
    tags: Mapping[str, str] = field(default_factory=dict)
    instance_id: str = ""
    created_time: str = "2024-01-01T00:00:00Z"
    account: str | None = None


@dataclass(frozen=True, slots=True)
class Faults:
    """Injected failures; every rate is a probability per call, drawn from the seeded RNG.

    `after_create` is the share of CreateImage and SyncImages faults applied after the image
    (or the copy) was made, so a client sees an error (or a dropped connection) for a call that
    in fact succeeded.
    """

    internal_error_rate: float = 0.0
    http_5xx_rate: float = 0.0
    drop_rate: float = 0.0
    latency: tuple[float, float] = (0.0, 0.0)
    after_create: float = 0.0

    @staticmethod
    def latency_around(mean: float, jitter: float) -> tuple[float, float]:
        """A latency range given as a mean plus or minus a jitter, in seconds."""
        return (max(0.0, mean - jitter), mean + jitter)

    @property
    def active(self) -> bool:
        """Whether this fault set can change any answer at all."""
        rates = self.internal_error_rate + self.http_5xx_rate + self.drop_rate
        return rates > 0 or self.latency[1] > 0


@dataclass(frozen=True, slots=True)
class SimConfig:
    """A whole simulator setup. Limits map an action to calls per second; None lifts it."""

    credentials: Mapping[str, str] = field(default_factory=dict, repr=False)
    tokens: Mapping[str, str] = field(default_factory=dict, repr=False)
    limits: Mapping[str, int | None] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    create_delay: tuple[float, float] = (0.05, 0.2)
    faults: Faults = field(default_factory=Faults)
    action_faults: Mapping[str, Faults] = field(default_factory=dict)
    instances: tuple[SimInstance, ...] = ()
    images: tuple[SimImageSeed, ...] = ()
    quota: Mapping[str, int] = field(default_factory=dict)
    default_quota: int = DEFAULT_QUOTA
    seed: int = 0
    legacy: bool = False
    clock_skew: float = 300.0
    # The real API's eventual consistency (docs/design.md#delete-delay, #listing-lag), off by
    # default:
    # - delete_delay: seconds a deleted image stays listed as DELETING, still holding its quota
    #   slot and its name, before it disappears;
    # - list_lag: seconds a new image is absent from DescribeImages after CreateImage answered,
    #   while its name is already taken and it already counts against the quota.
    delete_delay: float = 0.0
    list_lag: float = 0.0
    # Regions served: empty serves every well-formed region; otherwise these plus every region
    # the fleet, the quota map or the seeded images name. Others answer InvalidParameterValue.
    regions: tuple[str, ...] = ()
    # region -> actions not offered there (answered with UnsupportedRegion).
    actions_not_offered: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # DescribeInstances `tag:KEY` filters answer InvalidParameterValue.TagKeyNotFound when no
    # resource of the account carries KEY, as the real tag service does.
    check_tag_keys: bool = False
    # SyncImages (docs/design.md#syncimages; sync_images.py says which parts are the real API's):
    # - sync_delay: seconds a copy stays SYNCING in its destination (uniform range) while its
    #   SyncPercent rises, before it is NORMAL;
    # - sync_copies_tags: a copy carries the source's tags. Undocumented for the real API, so
    #   off: a copy carries no tags, and tag filters never find it;
    # - sync_checks_names: InvalidImageName.Duplicate when the destination already has an image
    #   of the copy's name. Undocumented for SyncImages (CreateImage does it), so on: the
    #   stricter case for a caller;
    # - source_busy_while_syncing: DeleteImages refuses a source while a sync from it runs;
    # - sync_unsupported_regions: destinations SyncImages refuses (UnsupportedOperation.Region);
    # - sync_image_set: answer ImageSet when ImageSetRequired is true; False answers without it,
    #   as an API before ImageSetRequired did.
    sync_delay: tuple[float, float] = (0.1, 0.4)
    sync_copies_tags: bool = False
    sync_checks_names: bool = True
    source_busy_while_syncing: bool = True
    sync_unsupported_regions: tuple[str, ...] = ()
    sync_image_set: bool = True

    def limit(self, action: str) -> int | None:
        """The per-second limit of an action, None when unlimited."""
        return self.limits.get(action, DEFAULT_LIMITS.get(action))


# Every published limit lifted, for benchmarks that measure the daemon rather than the API.
NO_LIMITS: Mapping[str, int | None] = dict.fromkeys(DEFAULT_LIMITS)
