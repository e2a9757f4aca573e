"""Generated fleets and fleet files (TOML and JSON)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import UsageError
from orchestrator.simulator.config import Faults, SimConfig
from orchestrator.simulator.fleet import generate_fleet, load_config, write_config
from tests.fixtures.sim import make_sim_config

FLEET_TOML = """
seed = 7
create_delay = [0.01, 0.02]
default_quota = 30

[credentials]
AKIDfleet = "fleet-key"

[limits]
CreateImage = 5
DescribeImages = 0

[quota]
ap-shanghai = 12

[faults]
internal_error_rate = 0.1
latency = [0.0, 0.01]

[action_faults.CreateImage]
drop_rate = 0.5
after_create = 1.0

[generate]
count = 3
tags = { backup = "weekly" }

[[instances]]
id = "ins-6pb6lrmy"
name = "web-1"
region = "ap-shanghai"
state = "STOPPED"
tags = { backup = "nightly" }
data_disks = ["disk-a1"]
behaviour = "busy"
busy_seconds = 2.5

[[images]]
id = "img-0yc6rie8"
name = "golden-base"
tags = { owner = "ops" }
"""


def test_generated_fleet_is_deterministic_and_unique() -> None:
    """The same seed gives the same fleet; ids are unique and well-formed."""
    fleet = generate_fleet(300, seed=3, regions=("ap-guangzhou", "ap-shanghai"), data_disks=2)
    assert fleet == generate_fleet(
        300, seed=3, regions=("ap-guangzhou", "ap-shanghai"), data_disks=2
    )
    assert len({i.instance_id for i in fleet}) == 300
    assert all(i.instance_id.startswith("ins-") and len(i.instance_id) == 12 for i in fleet)
    assert {i.region for i in fleet} == {"ap-guangzhou", "ap-shanghai"}
    assert all(len(i.data_disk_ids) == 2 and i.tags["backup"] == "daily" for i in fleet)


def test_generated_behaviours() -> None:
    """Behaviour shares are drawn per instance."""
    fleet = generate_fleet(1000, behaviours={"busy": 0.1, "fail": 0.2})
    counts = {b: sum(i.behaviour == b for i in fleet) for b in ("busy", "fail", "normal")}
    assert 50 < counts["busy"] < 150
    assert 140 < counts["fail"] < 260


def test_toml_fleet_file(tmp_path: Path) -> None:
    """Every section of a TOML fleet file lands in the config."""
    path = tmp_path / "fleet.toml"
    path.write_text(FLEET_TOML)
    config = load_config(path)
    assert dict(config.credentials) == {"AKIDfleet": "fleet-key"}
    assert (config.limit("CreateImage"), config.limit("DescribeImages")) == (5, None)
    assert config.limit("DeleteImages") == 10
    assert config.quota == {"ap-shanghai": 12}
    assert config.faults == Faults(internal_error_rate=0.1, latency=(0.0, 0.01))
    assert config.action_faults["CreateImage"].after_create == 1.0
    assert len(config.instances) == 4
    web = config.instances[-1]
    assert (web.instance_id, web.state, web.behaviour, web.busy_seconds) == (
        "ins-6pb6lrmy",
        "STOPPED",
        "busy",
        2.5,
    )
    assert config.instances[0].tags["backup"] == "weekly"
    assert config.images[0].name == "golden-base"


def test_json_round_trip(tmp_path: Path) -> None:
    """write_config then load_config gives back the same configuration."""
    original = make_sim_config(instances=4)
    path = write_config(original, tmp_path / "fleet.json")
    assert path.stat().st_mode & 0o077 == 0
    assert load_config(path) == original


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('[[instances]]\nid = "vm-1"\n', "instances[0].id"),
        ('[[instances]]\nid = "ins-1"\nstate = "ASLEEP"\n', "instances[0].state"),
        ('[[instances]]\nid = "ins-1"\nbehaviour = "odd"\n', "instances[0].behaviour"),
        ("[faults]\ndrop_rate = 2.0\n", "faults.drop_rate"),
        ("create_delay = [2, 1]\n", "create_delay"),
        ("[limits]\nCreateImage = -1\n", "limits.CreateImage"),
        ("seed = true\n", "seed"),
    ],
)
def test_bad_fleet_files_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    """A bad value is a UsageError naming the file and the field."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert field in str(caught.value)


def test_unreadable_fleet_file(tmp_path: Path) -> None:
    """A missing or malformed file is a UsageError."""
    with pytest.raises(UsageError):
        load_config(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("seed = = 1")
    with pytest.raises(UsageError):
        load_config(broken)


def test_defaults_are_the_published_limits() -> None:
    """Without overrides the published per-second limits apply."""
    config = SimConfig()
    assert [config.limit(a) for a in ("CreateImage", "DescribeImages", "DescribeImageQuota")] == [
        10,
        40,
        10,
    ]
