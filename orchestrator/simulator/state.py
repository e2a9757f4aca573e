"""The simulated account data and everything observed about the calls made against it.

Transitions are lazy (timeline.py): an image's CREATING end, a copy's SYNCING end
(`sync_delay`), an image's appearance in listings (`list_lag`), its DELETING end
(`delete_delay`) and an instance's return from a short-lived state wait on a heap, and every
read first settles what is due. The store is touched only from the event loop thread; tests
read it in-process between awaits.
"""

from __future__ import annotations

import random
import string
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from orchestrator.simulator.config import SimConfig, SimImageSeed, SimInstance
from orchestrator.simulator.denials import Denials
from orchestrator.simulator.ratelimit import RateWindows
from orchestrator.simulator.records import (
    SYNCING,
    Call,
    Deletion,
    InstanceRecord,
    SimImage,
    iso,
)
from orchestrator.simulator.regions import Regions
from orchestrator.simulator.timeline import Timeline

_ID_ALPHABET = string.ascii_lowercase + string.digits
NameKey = tuple[str, str, str]


class SimState:
    """Images, instances, deletions, calls, throttling statistics and duplicate detection."""

    def __init__(
        self,
        config: SimConfig,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.windows = RateWindows(config.limits, mono)
        self.create_delay = config.create_delay
        self.sync_delay = config.sync_delay
        self.legacy = config.legacy
        self.quota = dict(config.quota)
        self.deletions: list[Deletion] = []
        # Refusals injected by tests (`Simulator.set_account_error`), scoped like CAM.
        self.denials = Denials()
        self.regions = Regions(config)
        self.calls: list[Call] = []
        self.duplicates: list[str] = []
        self._wall = wall
        self._mono = mono
        self._rng = random.Random(config.seed)
        self._images: dict[str, SimImage] = {}
        self._live: dict[tuple[str, str], dict[str, SimImage]] = {}
        self._names: dict[NameKey, SimImage] = {}
        self._names_ever: Counter[NameKey] = Counter()
        # (account, region, tag key, tag value) -> live images: tag filters skip full scans.
        self._tagged: dict[tuple[str, str, str, str], dict[str, SimImage]] = {}
        self._timeline = Timeline()
        # Images made but not yet listed by DescribeImages (list_lag).
        self._unlisted: set[str] = set()
        # Tag keys the account's resources carry (None: instances every account sees). The tag
        # service keeps a key once created, so the sets only grow.
        self._tag_keys: dict[str | None, set[str]] = {}
        self._seq = 0
        self._start = mono()
        self.instances = {spec.instance_id: self._record(spec) for spec in config.instances}
        for seed in config.images:
            self._seed_image(seed)

    # -- clocks -------------------------------------------------------------------------------

    def now(self) -> float:
        """Wall-clock seconds since the epoch (the API's notion of time)."""
        return self._wall()

    def mono(self) -> float:
        """Monotonic seconds, for delays and busy periods."""
        return self._mono()

    @property
    def accounts(self) -> list[str]:
        """Every configured account (secret id), in configuration order."""
        return list(self.config.credentials)

    def quota_of(self, region: str) -> int:
        """The custom-image quota of a region (changeable at run time through `quota`)."""
        return self.quota.get(region, self.config.default_quota)

    # -- instances ----------------------------------------------------------------------------

    def _record(self, spec: SimInstance) -> InstanceRecord:
        busy_until = 0.0
        if spec.behaviour == "busy":
            busy_until = self._start + spec.busy_seconds if spec.busy_seconds else float("inf")
        self._tag_keys.setdefault(spec.account, set()).update(spec.tags)
        return InstanceRecord(spec=spec, state=spec.state, busy_until=busy_until)

    def instance(self, account: str, region: str, instance_id: str) -> InstanceRecord | None:
        """An instance the account can see in a region, or None."""
        self.refresh()
        record = self.instances.get(instance_id)
        return record if record is not None and record.visible_to(account, region) else None

    def visible_instances(self, account: str, region: str) -> list[InstanceRecord]:
        """The instances of an account in a region, in fleet order."""
        self.refresh()
        return [r for r in self.instances.values() if r.visible_to(account, region)]

    def add_instance(self, spec: SimInstance) -> None:
        """Add (or replace) an instance while running."""
        self.instances[spec.instance_id] = self._record(spec)
        self.regions.serve(spec.region)

    def remove_instance(self, instance_id: str) -> None:
        """Make an instance disappear, as a terminated one does."""
        self.instances.pop(instance_id, None)

    def set_instance_state(
        self, instance_id: str, state: str, seconds: float = 0.0, then: str = "RUNNING"
    ) -> None:
        """Change an instance's state; with `seconds`, only that long, then it becomes `then`."""
        record = self.instances[instance_id]
        record.state = state
        record.revert_at = self.mono() + seconds if seconds else 0.0
        record.revert_to = then
        if seconds:
            self._timeline.at(record.revert_at, partial(_revert, record, record.revert_at))

    def set_busy(self, instance_id: str, seconds: float) -> None:
        """Make an instance answer InstanceOperationInProgress for a while (0 ends it)."""
        self.instances[instance_id].busy_until = self.mono() + seconds if seconds else 0.0

    def account_error(self, action: str, account: str = "", region: str = "") -> str | None:
        """The refusal injected for this call of `action`, if any."""
        return self.denials.code(account, region, action)

    def has_tag_key(self, account: str, key: str) -> bool:
        """Whether any resource the account can see carries tag `key` (now or before)."""
        return key in self._tag_keys.get(account, ()) or key in self._tag_keys.get(None, ())

    # -- images -------------------------------------------------------------------------------

    def _seed_image(self, seed: SimImageSeed) -> None:
        account = seed.account or (self.accounts[0] if self.accounts else "")
        image = SimImage(
            image_id=seed.image_id,
            name=seed.name,
            account=account,
            region=seed.region,
            state=seed.state,
            created_time=seed.created_time,
            instance_id=seed.instance_id,
            tags=dict(seed.tags),
            ours=False,
            final_state=seed.state,
        )
        self.add_image(image, delay=None)

    def new_image_id(self) -> str:
        """A fresh `img-xxxxxxxx` id, unique in this simulator."""
        while True:
            image_id = "img-" + "".join(self._rng.choices(_ID_ALPHABET, k=8))
            if image_id not in self._images:
                return image_id

    def draw_delay(self) -> float:
        """How long the next image stays CREATING, in seconds."""
        low, high = self.create_delay
        return self._rng.uniform(low, high)

    def draw_sync_delay(self) -> float:
        """How long the next copy stays SYNCING, in seconds."""
        low, high = self.sync_delay
        return self._rng.uniform(low, high)

    def start_sync(self, source: SimImage, copy: SimImage, delay: float) -> None:
        """Store a SYNCING copy of `source`: listed after `list_lag`, NORMAL after `delay`."""
        now = self.mono()
        copy.copy_of, copy.copy_of_region = source.image_id, source.region
        copy.sync_started, copy.sync_until = now, now + delay
        self.add_image(copy, delay=None, lag=self.config.list_lag)
        source.syncing += 1
        self._timeline.at(copy.sync_until, partial(_synced, source, copy))

    def add_image(self, image: SimImage, delay: float | None, lag: float = 0.0) -> None:
        """Store an image; with a delay it is CREATING until then, with a lag it is unlisted."""
        self._seq += 1
        image.seq = self._seq
        self._images[image.image_id] = image
        self._live.setdefault((image.account, image.region), {})[image.image_id] = image
        key = (image.account, image.region, image.name)
        self._names[key] = image
        self._names_ever[key] += 1
        if self._names_ever[key] > 1:
            self.duplicates.append(image.name)
        for tag in image.tags.items():
            self._tagged.setdefault((image.account, image.region, *tag), {})[image.image_id] = image
        self._tag_keys.setdefault(image.account, set()).update(image.tags)
        if delay is not None:
            self._timeline.at(self.mono() + delay, partial(self._finish, image))
        if lag > 0:
            self._unlisted.add(image.image_id)
            self._timeline.at(self.mono() + lag, partial(self._unlisted.discard, image.image_id))

    def delete_image(self, image: SimImage, delete_binded_snap: bool) -> None:
        """Delete an image: gone at once, or DELETING for `delete_delay` seconds first.

        The deletion is recorded when DeleteImages answers; the record of the image stays.
        """
        at = iso(self.now())
        self.deletions.append(Deletion(image.image_id, image.account, delete_binded_snap, at))
        delay = self.config.delete_delay
        if delay <= 0:
            self._remove(image, at)
            return
        # Still listed, still holding its name and its quota slot, until it is gone.
        image.state = "DELETING"
        self._timeline.at(self.mono() + delay, partial(self._remove, image, None))

    def _remove(self, image: SimImage, at: str | None) -> None:
        image.deleted_time = at or iso(self.now())
        del self._live[(image.account, image.region)][image.image_id]
        self._names.pop((image.account, image.region, image.name), None)
        for tag in image.tags.items():
            self._tagged[(image.account, image.region, *tag)].pop(image.image_id, None)
        self._unlisted.discard(image.image_id)

    def refresh(self) -> None:
        """Settle every transition whose time has come."""
        self._timeline.run_due(self.mono())

    def _finish(self, image: SimImage) -> None:
        if image.state == "CREATING":
            image.state = image.final_state
        record = self.instances.get(image.instance_id)
        if record is not None and record.creating == image.image_id:
            record.creating = None

    def live_images(self, account: str, region: str) -> dict[str, SimImage]:
        """The account's existing images in a region, oldest first (unlisted ones included)."""
        self.refresh()
        return self._live.get((account, region), {})

    def listed(self, images: list[SimImage]) -> list[SimImage]:
        """`images` without those DescribeImages does not show yet (list_lag)."""
        unlisted = self._unlisted
        return [i for i in images if i.image_id not in unlisted] if unlisted else images

    def tagged(self, account: str, region: str, key: str, values: list[str]) -> list[SimImage]:
        """Live images carrying tag `key` with any of `values`, oldest first."""
        self.refresh()
        found: dict[str, SimImage] = {}
        for value in values:
            found.update(self._tagged.get((account, region, key, value), {}))
        return sorted(found.values(), key=lambda i: i.seq) if len(values) > 1 else [*found.values()]

    def image_named(self, account: str, region: str, name: str) -> SimImage | None:
        """The existing image with exactly this name, if any."""
        self.refresh()
        return self._names.get((account, region, name))

    @property
    def images(self) -> dict[str, SimImage]:
        """Every image ever known, deleted ones included, by id."""
        self.refresh()
        return self._images

    def images_named(self, name: str) -> list[SimImage]:
        """All images (deleted too) carrying exactly this name."""
        return [i for i in self.images.values() if i.name == name]

    def iter_ours(self) -> Iterator[SimImage]:
        """The images made through CreateImage (copies are not: see `iter_copies`)."""
        return (i for i in self.images.values() if i.ours and i.copy_of is None)

    def iter_copies(self, source_id: str | None = None) -> Iterator[SimImage]:
        """The copies made through SyncImages (of one source image, when given)."""
        return (
            i
            for i in self.images.values()
            if i.copy_of is not None and source_id in (None, i.copy_of)
        )

    # -- calls and throttling -----------------------------------------------------------------

    def record_call(self, call: Call) -> None:
        """Remember one answered call."""
        self.calls.append(call)

    def count_calls(self, action: str | None = None, code: str | None = None) -> int:
        """How many calls match an action and/or an answer code."""
        return sum(
            1
            for c in self.calls
            if (action is None or c.action == action) and (code is None or c.code == code)
        )

    @property
    def violations(self) -> dict[str, int]:
        """Throttled calls per action, over all accounts."""
        return self.windows.violations()

    def max_window(self, action: str, account: str | None = None) -> int:
        """The most calls of an action seen in any one-second window."""
        return self.windows.max_window(action, account)

    # -- inspection ---------------------------------------------------------------------------

    def to_json(self, *, include_calls: bool = True) -> dict[str, Any]:
        """The whole observable state, as `GET /_sim/state` serves it."""
        body: dict[str, Any] = {
            "images": [i.to_json() for i in self.images.values()],
            "copies": [_copy_json(i) for i in self.iter_copies()],
            "deletions": [d.to_json() for d in self.deletions],
            "violations": self.violations,
            "max_window": self.windows.max_windows(),
            "duplicates": list(self.duplicates),
            "duplicate_count": len(self.duplicates),
            "call_count": len(self.calls),
            "quota": dict(self.quota),
            "default_quota": self.config.default_quota,
        }
        if include_calls:
            body["calls"] = [c.to_json() for c in self.calls]
        return body


def _copy_json(copy: SimImage) -> dict[str, Any]:
    return {
        "image_id": copy.image_id,
        "name": copy.name,
        "region": copy.region,
        "state": copy.state,
        "source_image_id": copy.copy_of,
        "source_region": copy.copy_of_region,
        "deleted": copy.deleted_time,
    }


def _synced(source: SimImage, copy: SimImage) -> None:
    # The copy is done (it cannot have been deleted while SYNCING); its source is free again.
    if copy.state == SYNCING:
        copy.state = copy.final_state
    source.syncing -= 1


def _revert(record: InstanceRecord, due: float) -> None:
    # A later set_instance_state replaced this short-lived state: leave the record alone. The
    # state to return to is read from the record, not bound here: a replacement due at the
    # same instant (a frozen or coarse clock) must return to its own `then`, not this one's.
    if record.revert_at == due:
        record.state = record.revert_to
        record.revert_at = 0.0
