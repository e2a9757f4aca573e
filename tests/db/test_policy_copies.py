"""Cross-region copies in a policy: validated like every other field, stored, read back, diffed."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.policies import PolicyError, Retention, parse_text
from tests.fixtures.pg import run_sql

BASE = """
[[policies]]
name = "dr"
region = "ap-guangzhou"
schedule = "0 3 * * *"
instance_ids = ["ins-aaaaaaa1"]
[policies.retention]
keep_last = 3
"""


def _copy(region: str, rules: str = "keep_last = 1") -> str:
    return f'\n[[policies.copies]]\nregion = "{region}"\n{rules}\n'


def _problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_text(text, "dr.toml")
    return info.value.messages


def test_copies_parse_with_their_own_retention() -> None:
    """Each destination keeps its own rules, independent of the source's."""
    text = BASE + _copy("ap-shanghai") + _copy("ap-beijing", "keep_daily = 7\nmax_age_days = 30")
    (policy,) = parse_text(text, "dr.toml")
    assert [(c.region, c.retention) for c in policy.copies] == [
        ("ap-shanghai", Retention(keep_last=1)),
        ("ap-beijing", Retention(keep_daily=7, max_age_days=30)),
    ]


def test_no_copies_is_the_default() -> None:
    """A policy without [[policies.copies]] copies nowhere."""
    (policy,) = parse_text(BASE, "dr.toml")
    assert policy.copies == ()


@pytest.mark.parametrize(
    ("extra", "field", "reason"),
    [
        (_copy("ap-guangzhou"), "copies[1].region", "the policy's own region"),
        (_copy("ap-shanghai") + _copy("ap-shanghai"), "copies[2].region", "duplicate"),
        ("".join(_copy(f"ap-r{n}") for n in range(4)), "copies", "at most 3"),
        (_copy("Shanghai"), "copies[1].region", "a region like"),
        (_copy("ap-shanghai", "keep_last = 0"), "copies[1]", "at least one keep rule"),
        (_copy("ap-shanghai", "keep_last = 100000"), "copies[1].keep_last", "0 to 10000"),
        (_copy("ap-shanghai", "keep_last = 1\nbogus = 2"), "copies[1].bogus", "unknown key"),
        ("\n[[policies.copies]]\nkeep_last = 1\n", "copies[1].region", "missing"),
    ],
    ids=["source", "twice", "four", "bad-region", "no-rule", "huge-keep", "unknown", "no-region"],
)
def test_bad_copies_name_their_field(extra: str, field: str, reason: str) -> None:
    """A bad destination is refused with the field's path and the reason."""
    messages = _problems(BASE + extra)
    assert any(f"policy #1 'dr': {field}: " in m and reason in m for m in messages), messages


def test_copies_round_trip_through_the_table(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Applied copies are stored, read back equal (unchanged on re-apply), and diffed by field."""
    monkeypatch.setenv("CVM_BACKUP_DATABASE_URL", pg_dsn)
    monkeypatch.delenv("CVM_BACKUP_CONFIG", raising=False)
    path = tmp_path / "dr.toml"
    path.write_text(BASE + _copy("ap-shanghai"))
    assert cli.main(["policy", "apply", str(path)]) == 0
    stored = run_sql(pg_dsn, "SELECT copies FROM policies WHERE name = 'dr'")[0]["copies"]
    assert stored == [
        {
            "region": "ap-shanghai",
            "keep_last": 1,
            "keep_daily": 0,
            "keep_weekly": 0,
            "keep_monthly": 0,
            "keep_yearly": 0,
        }
    ]
    capsys.readouterr()
    assert cli.main(["policy", "apply", str(path)]) == 0
    assert "= dr: unchanged" in capsys.readouterr().out
    path.write_text(BASE + _copy("ap-shanghai", "keep_last = 2"))
    assert cli.main(["policy", "apply", str(path), "--dry-run"]) == 0
    assert "~ dr: changed copies" in capsys.readouterr().out
