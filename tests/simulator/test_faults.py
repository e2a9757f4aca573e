"""Fault injection: InternalError, HTTP 5xx, dropped connections, faults after CreateImage."""

from __future__ import annotations

from dataclasses import replace

import aiohttp
import pytest

from orchestrator.simulator.config import Faults, SimConfig
from orchestrator.simulator.faults import Fault, FaultInjector
from orchestrator.simulator.runner import Simulator, run_simulator
from tests.simulator.helpers import error_code, raw_call, sdk_client, sdk_error


async def test_internal_error_rate(simulator: Simulator) -> None:
    """At rate 1 every call answers InternalError, recorded as such."""
    simulator.set_faults(Faults(internal_error_rate=1.0))
    answer = await raw_call(simulator, "DescribeImageQuota", {})
    assert error_code(answer) == "InternalError"
    assert simulator.state.calls[-1].code == "InternalError"


async def test_per_action_faults(simulator: Simulator) -> None:
    """Faults set for one action leave the other actions alone."""
    simulator.set_faults(Faults(internal_error_rate=1.0), action="DescribeImages")
    assert error_code(await raw_call(simulator, "DescribeImages", {})) == "InternalError"
    assert error_code(await raw_call(simulator, "DescribeImageQuota", {})) is None
    simulator.clear_faults()
    assert error_code(await raw_call(simulator, "DescribeImages", {})) is None


async def test_http_5xx_is_a_server_network_error_for_the_sdk(simulator: Simulator) -> None:
    """An injected 502 reaches the SDK as ServerNetworkError."""
    simulator.set_faults(Faults(http_5xx_rate=1.0))
    assert await sdk_error(sdk_client(simulator), "DescribeImageQuota") == "ServerNetworkError"
    assert simulator.state.calls[-1].code == "HTTP502"


async def test_dropped_connection(simulator: Simulator) -> None:
    """A dropped call closes the connection without any answer."""
    simulator.set_faults(Faults(drop_rate=1.0))
    with pytest.raises(aiohttp.ClientError):
        await raw_call(simulator, "DescribeImageQuota", {})
    assert await sdk_error(sdk_client(simulator), "DescribeImageQuota") == "ClientNetworkError"
    assert [c.code for c in simulator.state.calls] == ["DROPPED", "DROPPED"]


async def test_drop_after_create_makes_the_image(simulator: Simulator) -> None:
    """With after_create, CreateImage makes the image and then drops the connection."""
    simulator.set_faults(Faults(drop_rate=1.0, after_create=1.0), action="CreateImage")
    instance_id = simulator.config.instances[0].instance_id
    with pytest.raises(aiohttp.ClientError):
        await raw_call(simulator, "CreateImage", {"InstanceId": instance_id, "ImageName": "x"})
    (image,) = simulator.state.images_named("x")
    assert image.state == "CREATING"
    simulator.clear_faults()
    again = await raw_call(simulator, "CreateImage", {"InstanceId": instance_id, "ImageName": "x"})
    assert error_code(again) == "InvalidImageName.Duplicate"


async def test_fault_before_create_makes_nothing(simulator: Simulator) -> None:
    """Without after_create, a CreateImage fault strikes before any image is made."""
    simulator.set_faults(Faults(internal_error_rate=1.0), action="CreateImage")
    instance_id = simulator.config.instances[0].instance_id
    answer = await raw_call(simulator, "CreateImage", {"InstanceId": instance_id, "ImageName": "y"})
    assert error_code(answer) == "InternalError"
    assert simulator.state.images_named("y") == []


async def test_faults_never_hit_inspection(simulator: Simulator) -> None:
    """GET /_sim/state answers even when every API call is dropped."""
    simulator.set_faults(Faults(drop_rate=1.0, latency=(0.0, 0.01)))
    async with aiohttp.ClientSession() as session, session.get(simulator.url + "/_sim/state") as r:
        assert r.status == 200
        assert "images" in await r.json()


async def test_faults_from_config_and_latency(sim_config: SimConfig) -> None:
    """Configured faults (with latency) apply from the start."""
    config = replace(sim_config, faults=Faults(internal_error_rate=1.0, latency=(0.0, 0.005)))
    async with run_simulator(config) as sim:
        assert error_code(await raw_call(sim, "DescribeInstances", {})) == "InternalError"


def test_same_seed_same_faults() -> None:
    """Two injectors with one seed decide identically; the rates are honoured roughly."""
    faults = Faults(internal_error_rate=0.2, http_5xx_rate=0.1, drop_rate=0.1, latency=(0, 1))
    first = FaultInjector(faults, {}, seed=7)
    second = FaultInjector(faults, {}, seed=7)
    decisions = [first.decide("DescribeImages") for _ in range(2000)]
    assert decisions == [second.decide("DescribeImages") for _ in range(2000)]
    errors = sum(d.fault is Fault.INTERNAL_ERROR for d in decisions)
    assert 300 < errors < 500
    assert all(0 <= d.latency <= 1 for d in decisions)


def test_no_faults_no_draws() -> None:
    """An inactive fault set never fires and never delays."""
    injector = FaultInjector(Faults(), {}, seed=1)
    decision = injector.decide("CreateImage")
    assert (decision.fault, decision.latency, decision.after) == (None, 0.0, False)


def test_latency_around() -> None:
    """A mean plus or minus jitter becomes a range that never goes below zero."""
    assert Faults.latency_around(0.05, 0.02) == pytest.approx((0.03, 0.07))
    assert Faults.latency_around(0.01, 0.05) == pytest.approx((0.0, 0.06))
