"""A full run against the simulator with faults: every job ends in the right terminal state."""

from __future__ import annotations

from dataclasses import replace

import asyncpg
import pytest

from orchestrator import naming
from orchestrator.context import EngineContext
from orchestrator.simulator.config import Faults, SimConfig, SimInstance
from orchestrator.simulator.runner import Simulator
from tests.fixtures.engine import drain, insert_policy, job_states
from tests.fixtures.logs import LogCapture
from tests.fixtures.sim import (
    FOREIGN_IMAGE,
    TEST_REGION,
    TEST_SECRET_ID,
    TEST_SECRET_KEY,
    assert_sim_clean,
    make_sim_config,
)

TAGS = {"backup": "daily"}


def _instance(instance_id: str, behaviour: str = "normal", busy: float = 0.0) -> SimInstance:
    return SimInstance(
        instance_id=instance_id,
        region=TEST_REGION,
        tags=TAGS,
        data_disk_ids=(f"disk-{instance_id[4:]}d0",),
        behaviour=behaviour,
        busy_seconds=busy,
    )


FLEET = (
    *(_instance(f"ins-norm{i:04d}") for i in range(10)),
    _instance("ins-busy0001", "busy", busy=0.6),
    _instance("ins-busy0002", "busy", busy=0.3),
    _instance("ins-fail0001", "fail"),
    _instance("ins-lega0001", "legacy"),
    _instance("ins-lega0002", "legacy"),
)
FAULTY = Faults(internal_error_rate=0.15, http_5xx_rate=0.05, drop_rate=0.05, after_create=0.5)


@pytest.fixture
def sim_config() -> SimConfig:
    """The whole fault menu: transients, busy, CREATEFAILED, legacy answers, a foreign image."""
    return replace(make_sim_config(), instances=FLEET, faults=FAULTY, seed=7)


async def test_full_run_ends_every_job_in_its_terminal_state(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """Transient faults, busy, legacy, CREATEFAILED and a missing instance all end correctly."""
    await insert_policy(pg_pool, "daily", instance_tags=TAGS, instance_ids=["ins-gone0001"])
    code = await drain(engine_ctx)
    states = await job_states(pg_pool)
    assert code == 1  # the CREATEFAILED instance's job failed
    assert states.pop("ins-gone0001") == ("skipped", "instance_gone", None)
    assert states.pop("ins-fail0001")[0] == "failed"
    assert {s for s, _, _ in states.values()} == {"succeeded"}, states
    images = [i for i in simulator.state.to_json()["images"] if i["ours"] and not i["deleted"]]
    # The CREATEFAILED image is deleted by the tracker when it can; only NORMAL ones count here.
    normal = [i for i in images if i["state"] == "NORMAL"]
    assert sorted(i["instance_id"] for i in normal) == sorted(states)
    assert {i["state"] for i in images} <= {"NORMAL", "CREATEFAILED"}
    assert all(i["tags"][naming.TAG_POLICY] == "daily" for i in images)
    assert simulator.state.images[FOREIGN_IMAGE.image_id].alive
    assert_sim_clean(simulator)


async def test_full_run_logs_every_transition_and_no_secret(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, captured_logs: LogCapture
) -> None:
    """The log of a faulty run names each transition with bound context, and leaks no secret."""
    await insert_policy(pg_pool, "daily", instance_tags=TAGS, instance_ids=["ins-gone0001"])
    await drain(engine_ctx)
    lines = captured_logs.lines
    events = {line["event"] for line in lines}
    expected = {
        "daemon.started",
        "run.created",
        "job.claimed",
        "job.dispatched",
        "image.created",
        "job.retry_scheduled",
        "image.ready",
        "job.succeeded",
        "image.failed",
        "job.failed",
        "job.skipped",
        "run.completed",
        "daemon.stopping",
        "daemon.stopped",
    }
    assert expected <= events, expected - events
    for line in lines:
        if line["event"] in ("job.claimed", "job.dispatched", "job.retry_scheduled"):
            assert {"policy", "instance", "job", "attempt"} <= set(line), line
    assert TEST_SECRET_KEY not in captured_logs.text
    assert TEST_SECRET_ID not in captured_logs.text
