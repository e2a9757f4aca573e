"""The demo's world: a fleet that misbehaves like a real one, a small quota, two policies.

The quota is sized from the fleet: everything slot 1 makes fits, with `headroom` images to
spare, so slot 2 runs into `ImageQuotaLimitExceeded` after a few images and only quota rotation
(evicting slot-1 images that a newer good image replaces) lets it finish.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace

from orchestrator.policies import Policy, parse_text
from orchestrator.simulator.config import Faults, SimConfig, SimImageSeed, SimInstance
from orchestrator.simulator.fleet import generate_fleet

REGION = "ap-guangzhou"
SEED = 20240601
SCHEDULE = "0 * * * *"  # hourly: slot 1 is the current hour, slot 2 the next one
TAG_POLICY = "fleet-hourly"
ID_POLICY = "db-extra"
# The id policy's backups are copied here (a [[policies.copies]] destination).
COPY_REGION = "ap-shanghai"
# An explicit target that DescribeInstances does not know: its job is skipped (instance gone).
MISSING_ID = "ins-decom001"
# Roles cycle web, db, cache, batch in generated fleets (simulator.fleet).
_DB_ROLE_INDEX = 1
_ROLES = 4

# CreateImage faults strike ~12% of calls; half of them after the image was made, so the
# dispatcher must look the name up before calling again. Describe* calls fail ~6% (the client
# retries those itself). DeleteImages and DescribeImageQuota answer cleanly.
CREATE_FAULTS = Faults(
    internal_error_rate=0.07,
    http_5xx_rate=0.03,
    drop_rate=0.02,
    latency=(0.0, 0.02),
    after_create=0.5,
)
DESCRIBE_FAULTS = Faults(internal_error_rate=0.04, http_5xx_rate=0.02, latency=(0.0, 0.02))


@dataclass(frozen=True, slots=True)
class Scale:
    """How big and how fast the demo is."""

    instances: int = 50
    build_seconds: tuple[float, float] = (2.0, 5.0)  # how long an image stays CREATING
    busy_seconds: float = 4.0  # busy instances refuse CreateImage this long, in each slot
    busy: int = 3
    failing: int = 2  # their images end CREATEFAILED
    manual: int = 4  # outside the tag policy; the id policy backs them up
    headroom: int = 6  # free image quota once slot 1 is done

    @property
    def fault_rate(self) -> float:
        """Share of CreateImage calls that fail transiently."""
        f = CREATE_FAULTS
        return f.internal_error_rate + f.http_5xx_rate + f.drop_rate


FULL = Scale()
FAST = Scale(
    instances=16,
    build_seconds=(0.2, 0.6),
    busy_seconds=1.5,
    busy=2,
    failing=2,
    manual=2,
    headroom=3,
)


@dataclass(frozen=True, slots=True)
class Scenario:
    """Everything the demo sets up, and the facts the summary explains."""

    scale: Scale
    sim: SimConfig
    policies_toml: str
    secret_id: str = field(repr=False)
    secret_key: str = field(repr=False)
    busy_ids: tuple[str, ...]
    failing_ids: tuple[str, ...]
    legacy_ids: tuple[str, ...]
    explicit_ids: tuple[str, ...]
    foreign: tuple[SimImageSeed, ...]
    quota: int

    def policies(self) -> list[Policy]:
        """The sample policies, validated like any policy file."""
        return parse_text(self.policies_toml, "demo policies")

    @property
    def jobs_per_slot(self) -> int:
        """Jobs each slot creates: every tagged instance plus every explicit id."""
        return self.scale.instances - self.scale.manual + len(self.explicit_ids)


def _behaviours(scale: Scale) -> list[str]:
    """Behaviour by fleet index: busy first, then failing, then one legacy, then normal."""
    kinds = ["busy"] * scale.busy + ["fail"] * scale.failing + ["legacy"]
    return kinds + ["normal"] * (scale.instances - len(kinds))


def build_fleet(scale: Scale) -> tuple[SimInstance, ...]:
    """The fleet: tagged `backup=hourly`, except the last `manual` ones (`backup=manual`)."""
    if scale.instances < scale.busy + scale.failing + 1 + scale.manual + _ROLES:
        raise ValueError(f"a demo fleet needs more than {scale.instances} instances")
    fleet = generate_fleet(scale.instances, regions=(REGION,), seed=SEED, tags={"backup": "hourly"})
    first_manual = scale.instances - scale.manual
    return tuple(
        replace(
            spec,
            behaviour=kind,
            busy_seconds=scale.busy_seconds if kind == "busy" else 0.0,
            tags={**spec.tags, "backup": "manual"} if index >= first_manual else spec.tags,
        )
        for index, (spec, kind) in enumerate(zip(fleet, _behaviours(scale), strict=True))
    )


def _overlap(fleet: tuple[SimInstance, ...], scale: Scale) -> SimInstance:
    """A normal, tagged db instance that both policies back up (they take turns: Mutex)."""
    first_normal = scale.busy + scale.failing + 1
    tagged = fleet[: scale.instances - scale.manual]
    return next(
        spec
        for index, spec in enumerate(tagged)
        if index >= first_normal and index % _ROLES == _DB_ROLE_INDEX
    )


def foreign_images(fleet: tuple[SimInstance, ...]) -> tuple[SimImageSeed, ...]:
    """Images that exist before the daemon and are not ours: none may ever be deleted."""
    first, second = fleet[0].instance_id, fleet[1].instance_id
    return (
        SimImageSeed("img-gold2024", "golden-base-2024", REGION, tags={"team": "platform"}),
        SimImageSeed("img-preupgr1", f"pre-upgrade-{first}", REGION, instance_id=first),
        SimImageSeed("img-citempl1", "ci-runner-template", REGION),
        # Named like one of ours but unknown to our tables: still not ours.
        SimImageSeed(
            "img-lookalik",
            f"cvmbk-{TAG_POLICY}-{second}-20240101T0300Z",
            REGION,
            instance_id=second,
        ),
        SimImageSeed("img-brokenim", "broken-import", REGION, state="CREATEFAILED"),
    )


def policies_toml(explicit_ids: tuple[str, ...]) -> str:
    """The sample policy file: a tag policy keeping 2 images, an id policy keeping 1 at home
    and 1 copy in COPY_REGION."""
    ids = ", ".join(f'"{i}"' for i in explicit_ids)
    return f"""\
[[policies]]
name = "{TAG_POLICY}"
region = "{REGION}"
schedule = "{SCHEDULE}"
instance_tags = {{ backup = "hourly" }}
completion_window = "2h"
on_quota = "rotate"
[policies.retention]
keep_last = 2

[[policies]]
name = "{ID_POLICY}"
region = "{REGION}"
schedule = "{SCHEDULE}"
instance_ids = [{ids}]
completion_window = "2h"
on_quota = "rotate"
[policies.retention]
keep_last = 1
[[policies.copies]]
region = "{COPY_REGION}"
keep_last = 1
"""


def _quota(scale: Scale, explicit: int, foreign: int) -> int:
    # What slot 1 leaves alive: every image but the CREATEFAILED ones (the tracker deletes
    # those), plus the images that are not ours, plus the headroom.
    alive_ours = scale.instances - scale.manual - scale.failing + explicit
    return foreign + alive_ours + scale.headroom


def build(scale: Scale) -> Scenario:
    """The demo scenario at `scale`, with fresh simulator credentials."""
    fleet = build_fleet(scale)
    manual = fleet[scale.instances - scale.manual :]
    explicit = (*(s.instance_id for s in manual), _overlap(fleet, scale).instance_id, MISSING_ID)
    foreign = foreign_images(fleet)
    quota = _quota(scale, len(explicit) - 1, len(foreign))
    secret_id, secret_key = "AKIDdemo" + secrets.token_hex(12), secrets.token_urlsafe(24)
    sim = SimConfig(
        credentials={secret_id: secret_key},
        create_delay=scale.build_seconds,
        action_faults={
            "CreateImage": CREATE_FAULTS,
            "DescribeImages": DESCRIBE_FAULTS,
            "DescribeInstances": DESCRIBE_FAULTS,
        },
        instances=fleet,
        images=foreign,
        quota={REGION: quota},
        seed=SEED,
    )
    return Scenario(
        scale=scale,
        sim=sim,
        policies_toml=policies_toml(explicit),
        secret_id=secret_id,
        secret_key=secret_key,
        busy_ids=_ids(fleet, "busy"),
        failing_ids=_ids(fleet, "fail"),
        legacy_ids=_ids(fleet, "legacy"),
        explicit_ids=explicit,
        foreign=foreign,
        quota=quota,
    )


def _ids(fleet: tuple[SimInstance, ...], behaviour: str) -> tuple[str, ...]:
    return tuple(s.instance_id for s in fleet if s.behaviour == behaviour)
