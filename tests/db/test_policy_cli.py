"""`policy apply` (diff, dry run, prune), `policy list` and `check`, driven through the CLI."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from orchestrator import cli, pauses
from orchestrator.tencent.errors import TencentError
from tests.fixtures.pg import run_sql

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "policies.example.toml"

TWO = """
[[policies]]
name = "alpha"
region = "ap-guangzhou"
schedule = "0 3 * * *"
timezone = "Asia/Shanghai"
instance_ids = ["ins-aaaaaaa1"]
[policies.retention]
keep_last = 3

[[policies]]
name = "beta"
region = "ap-shanghai"
schedule = "30 1 * * *"
instance_tags = { team = "data" }
[policies.retention]
keep_daily = 7
"""


@pytest.fixture
def cli_env(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CLI pointed at this test's database and nothing else."""
    monkeypatch.setenv("CVM_BACKUP_DATABASE_URL", pg_dsn)
    for var in ("DATABASE_URL", "CVM_BACKUP_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    return pg_dsn


def _apply(path: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(["policy", "apply", str(path), *flags])
    return code, capsys.readouterr().out


def _names(dsn: str) -> list[tuple[str, bool]]:
    rows = run_sql(dsn, "SELECT name, enabled FROM policies ORDER BY name")
    return [(r["name"], r["enabled"]) for r in rows]


def test_dry_run_shows_added_changed_unchanged_and_writes_nothing(
    cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run lists added, changed fields (old -> new) and unchanged, and writes nothing."""
    path = tmp_path / "p.toml"
    path.write_text(TWO)
    code, out = _apply(path, capsys, "--dry-run")
    assert code == 0
    assert "+ alpha: added" in out
    assert "+ beta: added" in out
    assert _names(cli_env) == []
    assert _apply(path, capsys)[0] == 0
    path.write_text(
        TWO.replace('"0 3 * * *"', '"0 4 * * *"').replace("keep_last = 3", "keep_last = 5")
    )
    code, out = _apply(path, capsys, "--dry-run")
    assert "~ alpha: changed schedule, retention.keep_last" in out
    assert "schedule: 0 3 * * * -> 0 4 * * *" in out
    assert "retention.keep_last: 3 -> 5" in out
    assert "= beta: unchanged" in out
    schedule = run_sql(cli_env, "SELECT schedule FROM policies WHERE name = 'alpha'")
    assert schedule[0]["schedule"] == "0 3 * * *"


def test_apply_updates_only_changed_rows(
    cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Re-applying writes the changed policy and leaves the unchanged row untouched."""
    path = tmp_path / "p.toml"
    path.write_text(TWO)
    _apply(path, capsys)
    stamps = {
        r["name"]: r["updated_at"]
        for r in run_sql(cli_env, "SELECT name, updated_at FROM policies")
    }
    path.write_text(TWO.replace('{ team = "data" }', '{ team = "data", tier = "gold" }'))
    code, out = _apply(path, capsys)
    assert code == 0
    assert "~ beta: changed instance_tags" in out
    rows = {r["name"]: r for r in run_sql(cli_env, "SELECT * FROM policies")}
    assert rows["beta"]["instance_tags"] == {"team": "data", "tier": "gold"}
    assert rows["alpha"]["updated_at"] == stamps["alpha"]
    assert rows["beta"]["updated_at"] > stamps["beta"]


def test_missing_policies_are_kept_without_prune(
    cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A policy absent from the file stays as it is unless --prune is given."""
    path = tmp_path / "p.toml"
    path.write_text(TWO)
    _apply(path, capsys)
    path.write_text(TWO.split('[[policies]]\nname = "beta"', maxsplit=1)[0])
    code, out = _apply(path, capsys)
    assert code == 0
    assert "? beta: not in file, left alone" in out
    assert _names(cli_env) == [("alpha", True), ("beta", True)]


def test_prune_deletes_unused_and_disables_policies_with_history(
    cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--prune deletes a policy that never ran and disables one that has runs."""
    path = tmp_path / "p.toml"
    path.write_text(TWO + TWO.replace('"alpha"', '"gamma"').replace('"beta"', '"delta"'))
    _apply(path, capsys)
    run_sql(
        cli_env,
        "INSERT INTO runs (policy_id, slot) SELECT id, now() FROM policies WHERE name = 'delta'",
    )
    path.write_text(TWO)
    code, out = _apply(path, capsys, "--prune", "--dry-run")
    assert "- gamma: deleted (not in file, never ran)" in out
    assert "- delta: disabled (not in file, has history)" in out
    assert len(_names(cli_env)) == 4
    code, out = _apply(path, capsys, "--prune")
    assert code == 0
    assert _names(cli_env) == [("alpha", True), ("beta", True), ("delta", False)]


def test_policy_list_shows_next_slot_in_policy_timezone(
    cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`policy list` prints each policy with its next slot in its own timezone."""
    path = tmp_path / "p.toml"
    path.write_text(
        TWO.replace(
            "[policies.retention]\nkeep_daily", "enabled = false\n[policies.retention]\nkeep_daily"
        )
    )
    _apply(path, capsys)
    capsys.readouterr()
    assert cli.main(["policy", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["NAME", "ENABLED"]
    alpha = next(line for line in lines if line.startswith("alpha"))
    assert " 03:00 +0800 " in alpha
    assert "Asia/Shanghai" in alpha
    assert "ins-aaaaaaa1" in alpha
    beta = next(line for line in lines if line.startswith("beta"))
    assert "(disabled)" in beta
    assert "tag:team=data" in beta


def test_policy_list_on_empty_database(cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """With no policies, `policy list` says how to add some."""
    assert cli.main(["policy", "list"]) == 0
    assert "no policies" in capsys.readouterr().out


def test_check_exit_codes(
    pg_empty_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check` exits 1 on an unmigrated database, 0 after migrate, 1 when unreachable."""
    monkeypatch.setenv("TENCENTCLOUD_SECRET_ID", "AKIDcheck")
    monkeypatch.setenv("TENCENTCLOUD_SECRET_KEY", "check-secret-key")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("CVM_BACKUP_CONFIG", raising=False)
    monkeypatch.setenv("CVM_BACKUP_DATABASE_URL", pg_empty_dsn)
    assert cli.main(["check"]) == 1
    assert "pending migration(s): 0001_init" in capsys.readouterr().out
    assert cli.main(["policy", "list"]) == 2
    assert "run `cvm-backup migrate`" in capsys.readouterr().err
    assert cli.main(["migrate"]) == 0
    assert "applied 0001_init" in capsys.readouterr().out
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "credentials[default]: ok (environment)" in out
    assert "check-secret-key" not in out
    monkeypatch.setenv(
        "CVM_BACKUP_DATABASE_URL",
        "postgresql://cvm:s3cret-pw@127.0.0.1:1/nowhere?connect_timeout=2",
    )
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "database: FAIL" in out
    assert "s3cret-pw" not in out


def test_apply_with_unreachable_database_names_dsn_without_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A valid file against an unreachable DSN exits 2 without printing the password."""
    monkeypatch.setenv("CVM_BACKUP_DATABASE_URL", "postgresql://cvm:s3cret-pw@127.0.0.1:1/x")
    path = tmp_path / "p.toml"
    path.write_text(TWO)
    assert cli.main(["policy", "apply", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cvm:***@127.0.0.1:1" in err
    assert "s3cret-pw" not in err


def test_example_file_applies(cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """config/policies.example.toml is valid and applies cleanly."""
    code, out = _apply(EXAMPLE, capsys)
    assert code == 0
    assert "+ web-nightly: added" in out


def test_check_fails_without_credentials(
    pg_dsn: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`check` exits 1 and says why when no link of the credentials chain has keys."""
    for var in ("TENCENTCLOUD_SECRET_ID", "TENCENTCLOUD_SECRET_KEY", "CVM_BACKUP_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CVM_BACKUP_METADATA_URL", "http://127.0.0.1:1/latest/meta-data")
    monkeypatch.setenv("CVM_BACKUP_DATABASE_URL", pg_dsn)
    assert cli.main(["check"]) == 1
    assert "credentials[default]: FAIL" in capsys.readouterr().out


def test_check_fails_while_an_account_is_paused(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A paused account makes `check` exit 1 with the reason and how to resume it."""
    monkeypatch.setenv("TENCENTCLOUD_SECRET_ID", "AKIDcheck")
    monkeypatch.setenv("TENCENTCLOUD_SECRET_KEY", "check-secret-key")
    monkeypatch.delenv("CVM_BACKUP_CONFIG", raising=False)
    monkeypatch.setenv("CVM_BACKUP_DATABASE_URL", pg_dsn)
    asyncio.run(_pause(pg_dsn, "default"))
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "account[default]: FAIL: paused since" in out
    assert "by AuthFailure.SecretIdNotFound" in out
    assert "cvm-backup account resume default" in out
    assert cli.main(["account", "resume", "default"]) == 0
    capsys.readouterr()
    assert cli.main(["check"]) == 0
    assert "accounts: ok (none paused)" in capsys.readouterr().out


async def _pause(dsn: str, account: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        refused = TencentError("AuthFailure.SecretIdNotFound", "no such key")
        await pauses.pause(
            conn,
            account,
            refused,
            region="ap-guangzhou",
            instance_id="ins-abc12345",
            first_probe=60,
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("flags", [(), ("--dry-run",)], ids=["apply", "dry-run"])
def test_apply_refuses_more_than_nine_instance_tags(
    cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: tuple[str, ...]
) -> None:
    """Ten tags would need eleven DescribeInstances filters: exit 2 naming file, policy, field."""
    ten = ", ".join(f't{n} = "v"' for n in range(10))
    path = tmp_path / "p.toml"
    path.write_text(TWO.replace('{ team = "data" }', "{ " + ten + " }"))
    capsys.readouterr()
    assert cli.main(["policy", "apply", str(path), *flags]) == 2
    err = capsys.readouterr().err
    assert f"{path}: policy #2 'beta': instance_tags: expected at most 9 tags" in err
    assert "got 10" in err
    assert "Traceback" not in err
    assert _names(cli_env) == []


def test_apply_accepts_nine_instance_tags(
    cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nine tags, the most DescribeInstances can filter on with one filter to spare, apply."""
    nine = ", ".join(f't{n} = "v"' for n in range(9))
    path = tmp_path / "p.toml"
    path.write_text(TWO.replace('{ team = "data" }', "{ " + nine + " }"))
    code, out = _apply(path, capsys)
    assert code == 0
    assert "+ beta: added" in out


def test_dry_run_refuses_what_the_database_refuses(
    cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CHECK the validator does not know refuses --dry-run exactly as it refuses apply."""
    run_sql(
        cli_env,
        "ALTER TABLE policies ADD CONSTRAINT site_rule CHECK (region <> 'ap-shanghai')",
    )
    path = tmp_path / "p.toml"
    path.write_text(TWO)
    for flags in (("--dry-run",), ()):
        capsys.readouterr()
        assert cli.main(["policy", "apply", str(path), *flags]) == 2
        assert "site_rule" in capsys.readouterr().err
    assert _names(cli_env) == []


def test_prune_of_an_empty_file_needs_yes(
    cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty file with --prune is refused (exit 2) unless --yes confirms it."""
    path = tmp_path / "p.toml"
    path.write_text(TWO)
    assert _apply(path, capsys)[0] == 0
    path.write_text("policies = []\n")
    assert _apply(path, capsys, "--prune")[0] == 2
    assert _names(cli_env) == [("alpha", True), ("beta", True)]
    code, out = _apply(path, capsys, "--prune", "--yes")
    assert code == 0
    assert "- alpha: deleted (not in file, never ran)" in out
    assert _names(cli_env) == []
