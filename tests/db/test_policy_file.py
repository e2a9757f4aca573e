"""Policy files: every malformed file is refused whole, with messages naming file, policy, field."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.policies import PolicyError, parse_text
from tests.fixtures.pg import run_sql

KEEPER = """
[[policies]]
name = "keeper"
region = "ap-guangzhou"
schedule = "{schedule}"
instance_ids = ["ins-keeper01"]
[policies.retention]
keep_last = 3
"""

GOOD = """
[[policies]]
name = "web-nightly"
region = "ap-guangzhou"
schedule = "0 3 * * *"
timezone = "Asia/Shanghai"
instance_ids = ["ins-6pb6lrmy"]
instance_tags = { backup = "nightly" }
force_poweroff = false
on_quota = "rotate"
completion_window = "6h"
[policies.retention]
keep_last = 7
keep_daily = 7
max_age_days = 400
"""


# Cases starting with this go before the keeper policy (top-level keys must come first).
TOP = "# top\n"


def bad(old: str, new: str) -> str:
    """The good policy with one piece of text replaced."""
    assert old in GOOD
    return GOOD.replace(old, new)


# (case id, file text after the keeper, text the error must contain)
CASES = [
    ("bad-cron-fields", bad('"0 3 * * *"', '"0 3 * *"'), "schedule: expected a five-field cron"),
    ("bad-cron-range", bad('"0 3 * * *"', '"61 3 * * *"'), "schedule: expected"),
    ("cron-never-matches", bad('"0 3 * * *"', '"0 3 30 2 *"'), "schedule: expected"),
    ("unknown-timezone", bad('"Asia/Shanghai"', '"Mars/Olympus"'), "timezone: expected"),
    ("bad-name", bad('"web-nightly"', '"Web_Nightly"'), "name: expected lowercase"),
    ("long-name", bad('"web-nightly"', '"' + "a" * 21 + '"'), "name: expected"),
    ("negative-keep", bad("keep_last = 7", "keep_last = -1"), "retention.keep_last: expected"),
    ("bool-keep", bad("keep_last = 7", "keep_last = true"), "retention.keep_last: expected"),
    ("string-keep", bad("keep_daily = 7", 'keep_daily = "7"'), "retention.keep_daily: expected"),
    (
        "no-keep-rule",
        bad("keep_last = 7\nkeep_daily = 7", "keep_last = 0"),
        "retention: expected at least one keep rule",
    ),
    ("no-retention", GOOD.split("[policies.retention]", maxsplit=1)[0], "retention: expected a"),
    (
        "zero-max-age",
        bad("max_age_days = 400", "max_age_days = 0"),
        "retention.max_age_days: expected",
    ),
    (
        "unknown-retention-key",
        bad("keep_daily = 7", "keep_hourly = 7"),
        "retention.keep_hourly: unknown key",
    ),
    (
        "empty-targets",
        bad(
            'instance_ids = ["ins-6pb6lrmy"]\ninstance_tags = { backup = "nightly" }',
            "instance_ids = []",
        ),
        "instance_ids: expected at least one target",
    ),
    ("bad-instance-id", bad('"ins-6pb6lrmy"', '"i-123"'), "instance_ids: expected"),
    (
        "unknown-key",
        bad('on_quota = "rotate"', 'on_quota = "rotate"\nschedul = "x"'),
        "schedul: unknown key",
    ),
    (
        "wrong-type-bool",
        bad("force_poweroff = false", 'force_poweroff = "no"'),
        "force_poweroff: expected true or false",
    ),
    ("wrong-type-ids", bad('["ins-6pb6lrmy"]', '"ins-6pb6lrmy"'), "instance_ids: expected"),
    ("bad-duration", bad('"6h"', '"6 hours"'), "completion_window: expected a duration"),
    ("int-duration", bad('"6h"', "6"), "completion_window: expected a duration"),
    ("zero-window", bad('"6h"', '"0h"'), "completion_window: expected a positive duration"),
    ("bad-region", bad('"ap-guangzhou"', '"guangzhou"'), "region: expected a region"),
    ("missing-region", bad('region = "ap-guangzhou"\n', ""), "region: missing"),
    ("bad-tag-map", bad('{ backup = "nightly" }', "{ backup = 1 }"), "instance_tags: expected"),
    (
        "empty-tag-value",
        bad('{ backup = "nightly" }', '{ backup = "" }'),
        "instance_tags: expected",
    ),
    ("bad-on-quota", bad('"rotate"', '"ignore"'), 'on_quota: expected "rotate" or "fail"'),
    ("duplicate-names", GOOD + GOOD, "name: duplicate"),
    ("bad-toml", GOOD + "\nname = = broken\n", "not valid TOML"),
    ("unknown-top-level", TOP + "version = 2\n" + GOOD, "unknown top-level key(s) version"),
    ("policies-not-tables", TOP + 'policies = "web-nightly"\n', "policies: expected [[policies]]"),
]


def _snapshot(dsn: str) -> list[tuple[object, ...]]:
    rows = run_sql(dsn, "SELECT * FROM policies ORDER BY id")
    return [tuple(r.values()) for r in rows]


@pytest.fixture
def cli_env(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CLI pointed at this test's database and nothing else."""
    monkeypatch.setenv("CVM_BACKUP_DATABASE_URL", pg_dsn)
    for var in ("DATABASE_URL", "CVM_BACKUP_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    return pg_dsn


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_file_changes_nothing(
    cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    """A malformed file exits 2, names file and field, and leaves the database unchanged."""
    before_file = tmp_path / "before.toml"
    before_file.write_text(KEEPER.format(schedule="0 1 * * *"))
    assert cli.main(["policy", "apply", str(before_file)]) == 0
    before = _snapshot(cli_env)
    path = tmp_path / "policies.toml"
    # The keeper's schedule changes too: a partial apply would show up in the snapshot.
    keeper = KEEPER.format(schedule="0 2 * * *")
    if text.startswith(TOP):
        keeper = "" if "policies =" in text else keeper  # cannot mix with [[policies]]
        path.write_text(text + keeper)
    else:
        path.write_text(keeper + text)
    capsys.readouterr()
    assert cli.main(["policy", "apply", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert expected in err
    assert _snapshot(cli_env) == before


def test_every_error_in_a_file_is_reported() -> None:
    """Problems in several fields and policies are all listed, each with its policy."""
    text = bad('"0 3 * * *"', '"0 3 * *"').replace('"6h"', '"6x"') + bad(
        "keep_last = 7", "keep_last = -1"
    )
    text = text.replace('name = "web-nightly"', 'name = "second"', 1)
    with pytest.raises(PolicyError) as caught:
        parse_text(text, "f.toml")
    messages = caught.value.messages
    assert any("policy #1 'second': schedule" in m for m in messages)
    assert any("policy #1 'second': completion_window" in m for m in messages)
    assert any("policy #2 'web-nightly': retention.keep_last" in m for m in messages)
    assert all(m.startswith("f.toml: ") for m in messages)


def test_missing_file_exits_2(cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that cannot be read is bad input, not a crash."""
    assert cli.main(["policy", "apply", "/nonexistent/policies.toml"]) == 2
    assert "/nonexistent/policies.toml: cannot read policy file" in capsys.readouterr().err


def test_good_file_parses_with_defaults() -> None:
    """Omitted fields take the documented defaults."""
    (policy,) = parse_text(GOOD, "good.toml")
    assert policy.account == "default"
    assert policy.enabled
    assert not policy.sysprep
    assert policy.completion_window.total_seconds() == 6 * 3600
    assert policy.retention.keep_weekly == 0
    assert policy.instance_tags == {"backup": "nightly"}
