"""Fleets: generated ones for tests, demos and benchmarks, and TOML/JSON fleet files.

A fleet file holds a whole `SimConfig`; every key is optional:

    seed = 7
    create_delay = [0.05, 0.2]      # seconds an image stays CREATING (uniform range)
    legacy = false                  # answer CreateImage without ImageId (older API)
    default_quota = 500
    delete_delay = 2.0              # seconds a deleted image stays listed as DELETING
    list_lag = 1.0                  # seconds a new image is missing from DescribeImages
    regions = ["ap-guangzhou"]      # serve only these (and the fleet's); default: all
    check_tag_keys = false          # tag:KEY filters of unknown keys answer TagKeyNotFound
    sync_delay = [0.1, 0.4]         # seconds a SyncImages copy stays SYNCING (uniform range)
    sync_copies_tags = false        # copies carry the source's tags (real API: undocumented)
    sync_checks_names = true        # a taken name in the destination answers Duplicate
    source_busy_while_syncing = true  # DeleteImages refuses a source while it syncs
    sync_unsupported_regions = []   # destinations answering UnsupportedOperation.Region
    sync_image_set = true           # false: SyncImages answers without ImageSet (older API)
    [actions_not_offered]           # region = actions answering UnsupportedRegion there
    ap-nanjing = ["CreateImage"]
    [credentials]                   # secret id = secret key; each secret id is an account
    AKIDexample = "secret"
    [limits]                        # calls per second; 0 lifts the limit
    CreateImage = 10
    [quota]                         # custom-image quota per region
    ap-guangzhou = 50
    [faults]                        # and [action_faults.CreateImage] for one action
    internal_error_rate = 0.01
    latency = [0.0, 0.05]
    [generate]                      # N generated instances (see generate_fleet)
    count = 300
    local_disks = 1                 # local data disks per instance, on a share of them
    local_share = 0.1
    [[instances]]
    id = "ins-6pb6lrmy"
    tags = { backup = "nightly" }
    behaviour = "busy"              # normal | busy | fail | legacy
    data_disks = ["disk-a1"]        # cloud disks
    local_data_disks = ["ldisk-a1"] # local disks: listed, but CreateImage refuses them
    local_disk_type = "LOCAL_SSD"   # LOCAL_BASIC (default) | LOCAL_SSD
    [[images]]                      # images that exist already and are not ours
    id = "img-0yc6rie8"
    name = "golden-base"
"""

from __future__ import annotations

import json
import random
import string
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError
from orchestrator.simulator.config import (
    BEHAVIOURS,
    DEFAULT_REGION,
    INSTANCE_STATES,
    LOCAL_DISK_TYPES,
    MAX_DELAY,
    Faults,
    SimConfig,
    SimImageSeed,
    SimInstance,
)

_ID_ALPHABET = string.ascii_lowercase + string.digits
_ROLES = ("web", "db", "cache", "batch")


def _ids(rng: random.Random, prefix: str, count: int) -> list[str]:
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen[prefix + "".join(rng.choices(_ID_ALPHABET, k=8))] = None
    return list(seen)


def _behaviour(rng: random.Random, shares: Mapping[str, float]) -> str:
    draw = rng.random()
    for behaviour, share in shares.items():
        if draw < share:
            return behaviour
        draw -= share
    return "normal"


@dataclass(frozen=True, slots=True)
class LocalDisks:
    """Local data disks of a generated fleet: `count` per instance on a `share` of instances."""

    count: int = 0
    share: float = 1.0
    disk_type: str = "LOCAL_BASIC"

    def has(self, index: int) -> bool:
        """Whether the index-th instance gets local disks."""
        # Spread evenly by index (no RNG draw, so fleets without local disks stay identical).
        return self.count > 0 and int((index + 1) * self.share) > int(index * self.share)

    def ids(self, index: int, suffix: str) -> tuple[str, ...]:
        """The local disk ids of the index-th instance."""
        return tuple(f"ldisk-{suffix}l{n}" for n in range(self.count)) if self.has(index) else ()


@dataclass(frozen=True, slots=True)
class _Template:
    """What every generated instance shares."""

    regions: tuple[str, ...]
    tags: dict[str, str]
    data_disks: int
    account: str | None
    local: LocalDisks

    def instance(self, index: int, instance_id: str, behaviour: str) -> SimInstance:
        """The index-th instance of the fleet."""
        region = self.regions[index % len(self.regions)]
        role = _ROLES[index % len(_ROLES)]
        suffix = instance_id.removeprefix("ins-")
        return SimInstance(
            instance_id=instance_id,
            name=f"sim-{role}-{index:04d}",
            region=region,
            zone=f"{region}-{1 + index % 3}",
            tags={**self.tags, "role": role},
            data_disk_ids=tuple(f"disk-{suffix}d{n}" for n in range(self.data_disks)),
            system_disk_id=f"disk-{suffix}",
            behaviour=behaviour,
            account=self.account,
            local_data_disk_ids=self.local.ids(index, suffix),
            local_disk_type=self.local.disk_type,
        )


def generate_fleet(
    count: int,
    *,
    regions: tuple[str, ...] = (DEFAULT_REGION,),
    seed: int = 0,
    tags: Mapping[str, str] | None = None,
    data_disks: int = 0,
    behaviours: Mapping[str, float] | None = None,
    account: str | None = None,
    local_disks: int = 0,
    local_share: float = 1.0,
    local_disk_type: str = "LOCAL_BASIC",
) -> tuple[SimInstance, ...]:
    """N deterministic instances spread over regions and zones.

    Each carries `tags` (default `backup=daily`) plus a `role` tag cycling web/db/cache/batch;
    `behaviours` gives the share of busy/fail/legacy instances (the rest are normal).
    `data_disks` cloud disks each; `local_disks` local disks of `local_disk_type` on an evenly
    spread `local_share` of the instances.
    """
    rng = random.Random(seed)
    base_tags = dict(tags) if tags is not None else {"backup": "daily"}
    local = LocalDisks(local_disks, local_share, local_disk_type)
    template = _Template(regions, base_tags, data_disks, account, local)
    return tuple(
        template.instance(i, instance_id, _behaviour(rng, behaviours or {}))
        for i, instance_id in enumerate(_ids(rng, "ins-", count))
    )


# -- files ------------------------------------------------------------------------------------


class _Reader:
    """Typed access to one table of a fleet file; errors name the file and the field."""

    def __init__(self, path: Path, where: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise UsageError(f"{path}: {where or 'the file'}: expected a table")
        self.path, self.where, self.table = path, where, table

    def fail(self, key: str, why: str) -> UsageError:
        """An error naming the file, the field and the reason."""
        field = f"{self.where}.{key}" if self.where else key
        return UsageError(f"{self.path}: {field}: {why}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        """A value of the given type, or the default when absent."""
        value = self.table.get(key, default)
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self.fail(key, "expected a number")
        if value is not default and not isinstance(value, kind):
            raise self.fail(key, f"expected {_kind_name(kind)}")
        return value

    def sub(self, key: str) -> _Reader:
        """A nested table (empty when absent)."""
        return _Reader(self.path, f"{self.where}.{key}".lstrip("."), self.table.get(key, {}))

    def pair(self, key: str, default: tuple[float, float]) -> tuple[float, float]:
        """A `[low, high]` range of seconds."""
        value = self.get(key, list, list(default))
        if len(value) != 2 or not all(isinstance(v, int | float) for v in value):
            raise self.fail(key, "expected [low, high]")
        low, high = float(value[0]), float(value[1])
        if not 0 <= low <= high <= MAX_DELAY:
            raise self.fail(key, f"expected 0 <= low <= high <= {MAX_DELAY:g}")
        return low, high

    def strings(self, key: str) -> dict[str, str]:
        """A table of string values."""
        table = self.get(key, dict, {})
        if not all(isinstance(v, str) for v in table.values()):
            raise self.fail(key, "expected string values")
        return dict(table)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _faults(reader: _Reader) -> Faults:
    rates = {
        key: float(reader.get(key, (int, float), 0.0))
        for key in ("internal_error_rate", "http_5xx_rate", "drop_rate", "after_create")
    }
    for key, rate in rates.items():
        if not 0.0 <= rate <= 1.0:
            raise reader.fail(key, "expected a probability between 0 and 1")
    return Faults(latency=reader.pair("latency", (0.0, 0.0)), **rates)


def _limits(reader: _Reader) -> dict[str, int | None]:
    limits: dict[str, int | None] = {}
    for action in reader.table:
        value = reader.get(action, int, 0)
        if value < 0:
            raise reader.fail(action, "expected a limit >= 0 (0 lifts it)")
        limits[action] = value or None
    return limits


def _instance(reader: _Reader) -> SimInstance:
    instance_id = reader.get("id", str, "")
    if not instance_id.startswith("ins-"):
        raise reader.fail("id", "expected an instance id like ins-6pb6lrmy")
    state = reader.get("state", str, "RUNNING")
    if state not in INSTANCE_STATES:
        raise reader.fail("state", f"unknown instance state {state!r}")
    behaviour = reader.get("behaviour", str, "normal")
    if behaviour not in BEHAVIOURS:
        raise reader.fail("behaviour", f"expected one of {sorted(BEHAVIOURS)}")
    region = reader.get("region", str, DEFAULT_REGION)
    return SimInstance(
        local_data_disk_ids=tuple(reader.get("local_data_disks", list, [])),
        local_disk_type=_local_disk_type(reader),
        instance_id=instance_id,
        name=reader.get("name", str, ""),
        region=region,
        zone=reader.get("zone", str, f"{region}-1"),
        state=state,
        tags=reader.strings("tags"),
        data_disk_ids=tuple(reader.get("data_disks", list, [])),
        system_disk_id=reader.get("system_disk", str, ""),
        os_name=reader.get("os_name", str, "TencentOS Server 3.1 (TK4)"),
        created_time=reader.get("created", str, "2024-01-01T00:00:00Z"),
        behaviour=behaviour,
        busy_seconds=float(reader.get("busy_seconds", (int, float), 0.0)),
        account=reader.get("account", str, None),
    )


def _local_disk_type(reader: _Reader) -> str:
    disk_type: str = reader.get("local_disk_type", str, "LOCAL_BASIC")
    if disk_type not in LOCAL_DISK_TYPES:
        raise reader.fail("local_disk_type", f"expected one of {sorted(LOCAL_DISK_TYPES)}")
    return disk_type


def _image(reader: _Reader) -> SimImageSeed:
    image_id = reader.get("id", str, "")
    if not image_id.startswith("img-"):
        raise reader.fail("id", "expected an image id like img-0yc6rie8")
    return SimImageSeed(
        image_id=image_id,
        name=reader.get("name", str, image_id),
        region=reader.get("region", str, DEFAULT_REGION),
        state=reader.get("state", str, "NORMAL"),
        tags=reader.strings("tags"),
        instance_id=reader.get("instance_id", str, ""),
        created_time=reader.get("created", str, "2024-01-01T00:00:00Z"),
        account=reader.get("account", str, None),
    )


def _items(reader: _Reader, key: str) -> list[_Reader]:
    return [
        _Reader(reader.path, f"{key}[{n}]", item)
        for n, item in enumerate(reader.get(key, list, []))
    ]


def _generated_from(reader: _Reader, seed: int) -> tuple[SimInstance, ...]:
    gen = reader.sub("generate")
    if not gen.table:
        return ()
    return generate_fleet(
        gen.get("count", int, 0),
        regions=tuple(gen.get("regions", list, [DEFAULT_REGION])),
        seed=gen.get("seed", int, seed),
        tags=gen.strings("tags") or None,
        data_disks=gen.get("data_disks", int, 0),
        behaviours={k: float(v) for k, v in gen.get("behaviours", dict, {}).items()},
        local_disks=gen.get("local_disks", int, 0),
        local_share=_share(gen, "local_share"),
        local_disk_type=_local_disk_type(gen),
    )


def _share(reader: _Reader, key: str) -> float:
    share = float(reader.get(key, (int, float), 1.0))
    if not 0.0 <= share <= 1.0:
        raise reader.fail(key, "expected a share between 0 and 1")
    return share


def _seconds(reader: _Reader, key: str) -> float:
    seconds = float(reader.get(key, (int, float), 0.0))
    if seconds < 0:
        raise reader.fail(key, "expected seconds >= 0")
    return seconds


def _not_offered(reader: _Reader) -> dict[str, tuple[str, ...]]:
    table = reader.get("actions_not_offered", dict, {})
    if not all(isinstance(v, list) and all(isinstance(a, str) for a in v) for v in table.values()):
        raise reader.fail("actions_not_offered", "expected region = [action, ...]")
    return {region: tuple(actions) for region, actions in table.items()}


def config_from_mapping(data: Mapping[str, Any], path: Path) -> SimConfig:
    """A SimConfig from the parsed contents of a fleet file."""
    top = _Reader(path, "", dict(data))
    seed = top.get("seed", int, 0)
    instances = _generated_from(top, seed) + tuple(_instance(r) for r in _items(top, "instances"))
    return SimConfig(
        credentials=top.strings("credentials"),
        tokens=top.strings("tokens"),
        limits={**SimConfig().limits, **_limits(top.sub("limits"))},
        create_delay=top.pair("create_delay", SimConfig().create_delay),
        faults=_faults(top.sub("faults")),
        action_faults={
            a: _faults(top.sub("action_faults").sub(a)) for a in top.get("action_faults", dict, {})
        },
        instances=instances,
        images=tuple(_image(r) for r in _items(top, "images")),
        quota={k: int(v) for k, v in top.get("quota", dict, {}).items()},
        default_quota=top.get("default_quota", int, SimConfig().default_quota),
        seed=seed,
        legacy=top.get("legacy", bool, False),
        clock_skew=float(top.get("clock_skew", (int, float), 300.0)),
        delete_delay=_seconds(top, "delete_delay"),
        list_lag=_seconds(top, "list_lag"),
        regions=tuple(top.get("regions", list, [])),
        actions_not_offered=_not_offered(top),
        check_tag_keys=top.get("check_tag_keys", bool, False),
        **_sync_options(top),
    )


def _sync_options(top: _Reader) -> dict[str, Any]:
    default = SimConfig()
    regions = top.get("sync_unsupported_regions", list, [])
    if not all(isinstance(r, str) for r in regions):
        raise top.fail("sync_unsupported_regions", "expected a list of region names")
    return {
        "sync_delay": top.pair("sync_delay", default.sync_delay),
        "sync_copies_tags": top.get("sync_copies_tags", bool, default.sync_copies_tags),
        "sync_checks_names": top.get("sync_checks_names", bool, default.sync_checks_names),
        "source_busy_while_syncing": top.get(
            "source_busy_while_syncing", bool, default.source_busy_while_syncing
        ),
        "sync_unsupported_regions": tuple(regions),
        "sync_image_set": top.get("sync_image_set", bool, default.sync_image_set),
    }


def load_config(path: Path) -> SimConfig:
    """Read a TOML (`.toml`) or JSON fleet file."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the fleet file: {exc.strerror}") from None
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: not a valid fleet file: {exc}") from None
    return config_from_mapping(data, path)


def config_to_mapping(config: SimConfig) -> dict[str, Any]:
    """The fleet-file form of a config (JSON-ready; it includes the secret keys)."""
    return {
        "seed": config.seed,
        "legacy": config.legacy,
        "create_delay": list(config.create_delay),
        "clock_skew": config.clock_skew,
        "default_quota": config.default_quota,
        "delete_delay": config.delete_delay,
        "list_lag": config.list_lag,
        "regions": list(config.regions),
        "actions_not_offered": {r: list(a) for r, a in config.actions_not_offered.items()},
        "check_tag_keys": config.check_tag_keys,
        "sync_delay": list(config.sync_delay),
        "sync_copies_tags": config.sync_copies_tags,
        "sync_checks_names": config.sync_checks_names,
        "source_busy_while_syncing": config.source_busy_while_syncing,
        "sync_unsupported_regions": list(config.sync_unsupported_regions),
        "sync_image_set": config.sync_image_set,
        "credentials": dict(config.credentials),
        "tokens": dict(config.tokens),
        "limits": {a: n or 0 for a, n in config.limits.items()},
        "quota": dict(config.quota),
        "faults": _faults_mapping(config.faults),
        "action_faults": {a: _faults_mapping(f) for a, f in config.action_faults.items()},
        "instances": [_instance_mapping(i) for i in config.instances],
        "images": [_image_mapping(i) for i in config.images],
    }


def _faults_mapping(faults: Faults) -> dict[str, Any]:
    return {**asdict(faults), "latency": list(faults.latency)}


def _instance_mapping(spec: SimInstance) -> dict[str, Any]:
    data = {
        "id": spec.instance_id,
        "name": spec.name,
        "region": spec.region,
        "zone": spec.zone,
        "state": spec.state,
        "tags": dict(spec.tags),
        "data_disks": list(spec.data_disk_ids),
        "system_disk": spec.system_disk_id,
        "os_name": spec.os_name,
        "created": spec.created_time,
        "behaviour": spec.behaviour,
        "busy_seconds": spec.busy_seconds,
        "local_data_disks": list(spec.local_data_disk_ids),
        "local_disk_type": spec.local_disk_type,
    }
    return data if spec.account is None else {**data, "account": spec.account}


def _image_mapping(seed: SimImageSeed) -> dict[str, Any]:
    data = {
        "id": seed.image_id,
        "name": seed.name,
        "region": seed.region,
        "state": seed.state,
        "tags": dict(seed.tags),
        "instance_id": seed.instance_id,
        "created": seed.created_time,
    }
    return data if seed.account is None else {**data, "account": seed.account}


def write_config(config: SimConfig, path: Path) -> Path:
    """Write a config as a JSON fleet file (mode 0600: it holds secret keys)."""
    path.write_text(json.dumps(config_to_mapping(config), indent=2), encoding="utf-8")
    path.chmod(0o600)
    return path
