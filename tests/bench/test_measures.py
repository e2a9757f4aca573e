"""The bench's pure parts: slot planning, rates and the verdicts printed beside targets."""

from __future__ import annotations

from datetime import UTC, datetime

from orchestrator.bench.fleet import SLOT_LEAD, plan_slot
from orchestrator.bench.measures import max_gap, ratio, span_rate
from orchestrator.bench.options import SLOT_NEXT_MINUTE, SLOT_NOW
from orchestrator.bench.report import judge, targets_table


def test_next_minute_slot_is_a_whole_minute_far_enough_ahead() -> None:
    """The planned slot is on a minute boundary, at least SLOT_LEAD away, as a daily UTC cron."""
    now = datetime(2026, 11, 23, 10, 59, 57, tzinfo=UTC).timestamp()
    plan = plan_slot(SLOT_NEXT_MINUTE, now)
    assert plan.slot is not None
    assert plan.slot % 60 == 0
    assert plan.slot - now >= SLOT_LEAD
    assert plan.schedule == "1 11 * * *"


def test_now_slot_is_already_due() -> None:
    """`--quick` uses a daily slot whose window is still open, so the first pass runs it."""
    plan = plan_slot(SLOT_NOW, 0.0)
    assert plan.slot is None
    assert plan.window.days >= 1


def test_rates_and_gaps() -> None:
    """Rates count intervals between calls; a single call has no rate."""
    assert span_rate([0.0, 0.1, 0.2, 0.3, 0.4]) == 10.0
    assert span_rate([1.0]) is None
    assert max_gap([0.0, 0.5, 2.5, 3.0]) == 2.0
    assert ratio(9.5, 10, 2) == 0.95
    assert ratio(1.0, 0) is None


def test_targets_are_judged_and_missing_ones_are_not_measured() -> None:
    """A met target, a missed one, and one whose scenario did not run."""
    results = {"fleet": {"utilization": 0.98, "completion_ratio": 1.3}, "memory": {}}
    verdicts = {t["name"]: t["met"] for t in judge(results)}
    assert verdicts["CreateImage utilization"] is True
    assert verdicts["completion / lower bound"] is False
    assert verdicts["peak RSS"] is None
    table = targets_table(results)
    assert "MISSED" in table
    assert "not measured" in table
