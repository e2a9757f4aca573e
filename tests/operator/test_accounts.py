"""Paused accounts for operators: `account list`, `account resume NAME`, and `status`."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import asyncpg
import jsonschema
import pytest

from orchestrator import cli, pauses, status
from orchestrator.db import pool as db_pool
from orchestrator.tencent.errors import TencentError
from tests.fixtures.operator import insert_policy
from tests.fixtures.pg import run_async, run_sql

REFUSAL = TencentError(
    "UnauthorizedOperation.PermissionDenied", "CAM policy denies cvm:CreateImage", "req-cam-1"
)
INSTANCE = "ins-acct0001"


async def _pause(conn: Any, account: str = "default") -> None:
    await pauses.pause(
        conn, account, REFUSAL, region="ap-guangzhou", instance_id=INSTANCE, first_probe=300
    )


def _pause_on(dsn: str, account: str = "default") -> None:
    async def write() -> None:
        conn = await db_pool.connect_dsn(dsn)
        try:
            await _pause(conn, account)
        finally:
            await conn.close()

    run_async(write)


@pytest.fixture
def db_env(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CLI pointed at this test's database (and no config file)."""
    monkeypatch.setenv("CVM_BACKUP_DATABASE_URL", pg_dsn)
    monkeypatch.delenv("CVM_BACKUP_CONFIG", raising=False)
    return pg_dsn


def test_account_list_shows_why_and_when_next(
    db_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`account list` names the paused account, its error and next probe; --json has them all."""
    assert cli.main(["account", "list"]) == 0
    assert capsys.readouterr().out.strip() == "no account is paused"
    _pause_on(db_env, "prod")
    assert cli.main(["account", "list"]) == 0
    text = capsys.readouterr().out
    assert "prod" in text
    assert "UnauthorizedOperation.PermissionDenied: CAM policy denies" in text
    assert "cvm-backup account resume NAME" in text
    assert cli.main(["account", "list", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["account"] == "prod"
    assert (entry["code"], entry["request_id"], entry["failed_probes"]) == (
        REFUSAL.code,
        "req-cam-1",
        0,
    )
    assert entry["next_probe_at"] > entry["since"]


def test_account_resume_lifts_the_pause_and_records_who(
    db_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`account resume NAME` deletes the row, ledgers it as the operator's, and says so."""
    _pause_on(db_env)
    assert cli.main(["account", "resume", "default"]) == 0
    assert "account 'default' resumed" in capsys.readouterr().out
    assert run_sql(db_env, "SELECT * FROM account_pauses") == []
    ledger = run_sql(db_env, "SELECT kind, account, reason FROM events ORDER BY id")
    assert [tuple(r) for r in ledger] == [
        ("account.paused", "default", REFUSAL.code),
        ("account.resumed", "default", "operator"),
    ]


@pytest.mark.parametrize("name", ["default", "nosuch"])
def test_account_resume_of_an_account_not_paused_exits_2(
    db_env: str, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """Nothing to resume is bad input: exit 2 with a message naming the account."""
    assert cli.main(["account", "resume", name]) == 2
    err = capsys.readouterr().err
    assert f"account {name!r} is not paused" in err


def _schema() -> dict[str, Any]:
    text = resources.files("orchestrator").joinpath("data/status.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


async def test_status_shows_the_paused_account_of_each_policy(
    pg_pool: asyncpg.Pool, instance_ids: list[str]
) -> None:
    """Rows of a paused account's policies carry the pause; the table adds a paused section."""
    await insert_policy(pg_pool, "paused", instance_ids[:1])
    await insert_policy(pg_pool, "other", instance_ids[1:2])
    await pg_pool.execute("UPDATE policies SET account = 'prod' WHERE name = 'other'")
    rows = await status.fetch_rows(pg_pool)
    assert all(r["account_paused"] is None for r in rows)
    assert "PAUSED" not in status.render_table(rows)
    await _pause(pg_pool)
    rows = await status.fetch_rows(pg_pool)
    jsonschema.Draft202012Validator(_schema()).validate(rows)
    by_policy = {r["policy"]: r for r in rows}
    assert by_policy["other"]["account_paused"] is None
    paused = by_policy["paused"]["account_paused"]
    assert (paused["code"], paused["failed_probes"]) == (REFUSAL.code, 0)
    assert by_policy["paused"]["account"] == "default"
    table = status.render_table(rows).splitlines()
    assert table[-4] == ""
    assert table[-3].startswith("PAUSED ACCOUNT")
    assert table[-2].startswith("default ")
    assert REFUSAL.code in table[-2]
    assert "cvm-backup account resume NAME" in table[-1]
