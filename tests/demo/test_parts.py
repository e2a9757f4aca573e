"""The demo's scenario arithmetic and its live view's rates and ETA."""

from __future__ import annotations

from collections import deque

import pytest

from orchestrator.demo import scenario
from orchestrator.demo.progress import MIN_RATE_SPAN, Sample, call_rates, eta_seconds
from orchestrator.demo.scenario import FAST, FULL, Scale


@pytest.mark.parametrize("scale", [FAST, FULL])
def test_quota_leaves_exactly_the_headroom_after_slot_one(scale: Scale) -> None:
    """Slot 1 fits with `headroom` images to spare, so slot 2 must rotate to finish."""
    built = scenario.build(scale)
    fleet = built.sim.instances
    tagged = [i for i in fleet if i.tags["backup"] == "hourly"]
    present = [i for i in built.explicit_ids if i in {s.instance_id for s in fleet}]
    alive_after_slot_one = len(tagged) - len(built.failing_ids) + len(present)
    assert built.quota == len(built.foreign) + alive_after_slot_one + scale.headroom
    assert built.scale.headroom < alive_after_slot_one
    assert built.jobs_per_slot == len(tagged) + len(built.explicit_ids)


@pytest.mark.parametrize("scale", [FAST, FULL])
def test_fleet_has_every_kind_of_trouble(scale: Scale) -> None:
    """Busy, failing and legacy instances, a missing explicit id, and foreign images."""
    built = scenario.build(scale)
    ids = {s.instance_id for s in built.sim.instances}
    assert len(ids) == scale.instances
    assert (len(built.busy_ids), len(built.failing_ids)) == (scale.busy, scale.failing)
    assert len(built.legacy_ids) == 1
    assert scenario.MISSING_ID in built.explicit_ids
    assert scenario.MISSING_ID not in ids
    assert not {s.image_id for s in built.foreign} & {"", *ids}
    assert {p.name for p in built.policies()} == {scenario.TAG_POLICY, scenario.ID_POLICY}


def test_fresh_credentials_each_time_and_never_in_repr() -> None:
    """Each demo signs with new simulator keys, which the scenario's repr never shows."""
    first, second = scenario.build(FAST), scenario.build(FAST)
    assert first.secret_key != second.secret_key
    assert first.secret_key not in repr(first)
    assert first.secret_id not in repr(first)


def test_a_fleet_too_small_for_the_story_is_refused() -> None:
    """The scenario needs room for every kind of instance."""
    with pytest.raises(ValueError, match="more than"):
        scenario.build_fleet(Scale(instances=5))


def _sample(at: float, done: int, total: int = 10, calls: int = 0) -> Sample:
    return Sample(at, {"succeeded": done, "pending": total - done}, {"CreateImage": calls})


def test_eta_is_unknown_until_jobs_finish_then_follows_the_rate() -> None:
    """No completions yet: no ETA; 4 done in 2 s with 6 left: 3 s."""
    history = deque([_sample(0.0, 0), _sample(1.0, 0)])
    assert eta_seconds(history) is None
    history.append(_sample(2.0, 4))
    assert eta_seconds(history) == pytest.approx(3.0)
    history.append(_sample(3.0, 10))
    assert eta_seconds(history) == 0.0


def test_call_rate_waits_for_a_long_enough_span() -> None:
    """Rates over a short span overstate; none is shown until MIN_RATE_SPAN has passed."""
    history = deque([_sample(0.0, 0, calls=0), _sample(MIN_RATE_SPAN / 2, 0, calls=6)])
    assert call_rates(history) is None
    history.append(_sample(MIN_RATE_SPAN + 0.5, 0, calls=int(10 * (MIN_RATE_SPAN + 0.5))))
    rates = call_rates(history)
    assert rates is not None
    assert rates == pytest.approx((10.0, 10.0))
