"""`plan`: targets with DryRuns, the retention deletes with reasons, nothing changed anywhere."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import structlog

from orchestrator import cli
from orchestrator.context import EngineContext
from orchestrator.plan import make_plan
from orchestrator.simulator.runner import Simulator
from tests.fixtures.engine import insert_policy as insert_tag_policy
from tests.fixtures.operator import SEEDED, insert_image, insert_policy
from tests.fixtures.sim import TEST_REGION, make_sim_config

GONE = "ins-gone0000"


@pytest.fixture
def cli_env(sim_env: Simulator, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The command's environment: this test's database and the simulator; logs reset after."""
    monkeypatch.setenv("CVM_BACKUP_DATABASE_URL", pg_dsn)
    monkeypatch.setenv("CVM_BACKUP_LOG_FORMAT", "json")
    monkeypatch.delenv("CVM_BACKUP_CONFIG", raising=False)
    yield
    structlog.reset_defaults()


async def run_cli(*argv: str) -> int:
    """`cvm-backup ARGV` in a worker thread, so the simulator keeps serving on this loop."""
    return await asyncio.to_thread(cli.main, list(argv))


async def seed_history(pool: asyncpg.Pool, instance_ids: list[str]) -> int:
    """Policy `web` (keep_last 2) over two instances and an unknown id, with images of ours."""
    policy_id = await insert_policy(
        pool, "web", [*instance_ids[:2], GONE], keep_last=2, include_data_disks=True
    )
    now = datetime.now(UTC)
    first, second = instance_ids[:2]
    for days, image_id in zip((3, 2, 1), SEEDED[:3], strict=True):
        await insert_image(pool, policy_id, first, image_id, now - timedelta(days=days))
    await insert_image(pool, policy_id, first, "img-build001", now, state="CREATING")
    await insert_image(
        pool, policy_id, second, SEEDED[3], now - timedelta(days=9), delete_reason="expired"
    )
    await insert_image(pool, policy_id, instance_ids[4], "img-other001", now)
    return policy_id


async def test_plan_shows_deletes_and_reasons(
    ctx: EngineContext, instance_ids: list[str], sim_env: Simulator
) -> None:
    """Retention, counting the image this run adds, deletes the two oldest; reasons given."""
    await seed_history(ctx.pool, instance_ids)
    plan = await make_plan(ctx, "web")
    verdicts = {i.image_id: (i.action, i.reasons) for i in plan.images}
    old1, old2, old3, pending = SEEDED
    assert verdicts[old1] == ("delete", ("not selected by any rule",))
    assert verdicts[old2] == ("delete", ("not selected by any rule",))
    assert verdicts[old3] == ("keep", ("keep_last 2/2",))  # 1/2 is the image this run makes
    assert verdicts["img-build001"] == ("keep", ("state CREATING: not deletable",))
    assert verdicts[pending] == ("delete", ("pending delete intent: expired",))
    assert "img-other001" not in verdicts
    assert plan.untargeted_images == 1
    assert not plan.ok
    by_id = {t.instance_id: (t.exists, t.dry_run.ok, t.dry_run.code) for t in plan.targets}
    assert by_id == {
        instance_ids[0]: (True, True, "DryRunOperation"),
        instance_ids[1]: (True, True, "DryRunOperation"),
        GONE: (False, False, "InvalidInstanceId.NotFound"),
    }


async def test_plan_changes_nothing(
    ctx: EngineContext, instance_ids: list[str], sim_env: Simulator
) -> None:
    """No image created or deleted at the simulator; no row or event written."""
    await seed_history(ctx.pool, instance_ids)
    images_before = await ctx.pool.fetch("SELECT * FROM images ORDER BY image_id")
    sim_before = set(sim_env.state.live_images(*_sim_scope(sim_env)))
    await make_plan(ctx, "web")
    assert await ctx.pool.fetch("SELECT * FROM images ORDER BY image_id") == images_before
    for table in ("jobs", "runs", "events"):
        assert await ctx.pool.fetchval(f"SELECT count(*) FROM {table}") == 0
    assert set(sim_env.state.live_images(*_sim_scope(sim_env))) == sim_before
    assert sim_env.state.to_json()["deletions"] == []
    assert sim_env.state.count_calls("DeleteImages") == 0
    assert sim_env.state.count_calls("CreateImage") == 3  # the three DryRuns
    assert not list(sim_env.state.iter_ours())


def _sim_scope(sim: Simulator) -> tuple[str, str]:
    from tests.fixtures.sim import TEST_REGION

    return sim.state.accounts[0], TEST_REGION


async def test_plan_command_table(
    cli_env: None,
    pg_pool: asyncpg.Pool,
    instance_ids: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The table names each DryRun's answer and each delete's reason; a failed DryRun exits 1."""
    await seed_history(pg_pool, instance_ids)
    assert await run_cli("plan", "web") == 1
    out = capsys.readouterr().out
    assert "Plan for policy web (enabled; account default, region ap-guangzhou)" in out
    assert "Instances: 2 to back up, 1 missing" in out
    gone = next(line for line in out.splitlines() if GONE in line)
    assert "FAILED: InvalidInstanceId.NotFound" in gone
    ok_lines = [line for line in out.splitlines() if line.strip().startswith(instance_ids[0])]
    assert ok_lines[0].split()[-1] == "ok"
    assert "3 of 5 images would be deleted" in out
    old = next(line for line in out.splitlines() if SEEDED[0] in line)
    assert "delete" in old
    assert "not selected by any rule" in old
    assert "Some DryRuns FAILED" in out


async def test_plan_command_json_all_ok(
    cli_env: None,
    pg_pool: asyncpg.Pool,
    instance_ids: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--json on a policy whose instances all exist: ok everywhere, exit 0, documented keys."""
    await insert_policy(pg_pool, "db", instance_ids[2:4], keep_last=1)
    assert await run_cli("plan", "db", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["policy"] == "db"
    assert doc["ok"] is True
    assert doc["retention"] == []
    assert set(doc) == {
        "policy",
        "account",
        "region",
        "enabled",
        "slot",
        "ok",
        "instances",
        "retention",
        "untargeted_images",
        "no_targets",
        "copies",
    }
    assert doc["no_targets"] is None
    assert doc["copies"] == []
    assert [i["instance_id"] for i in doc["instances"]] == instance_ids[2:4]
    for instance in doc["instances"]:
        assert instance["exists"] is True
        assert instance["dry_run"]["ok"] is True
        assert instance["dry_run"]["code"] == "DryRunOperation"
        assert instance["dry_run"]["request_id"]


async def test_plan_unknown_policy(
    cli_env: None, pg_pool: asyncpg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown policy is a usage error naming it: exit 2."""
    assert await run_cli("plan", "nope") == 2
    assert "no policy named 'nope'" in capsys.readouterr().err


UNKNOWN_KEY = "nobody-has-this"


@pytest.mark.parametrize("sim_config", [replace(make_sim_config(), check_tag_keys=True)])
async def test_plan_unknown_tag_key_is_no_targets(
    cli_env: None, pg_pool: asyncpg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    """TagKeyNotFound shows as no targets, naming the key, not as an error: exit 0."""
    await insert_tag_policy(pg_pool, "untagged", instance_tags={UNKNOWN_KEY: "yes"})
    reason = f"no instance carries tag key `{UNKNOWN_KEY}`"
    assert await run_cli("plan", "untagged") == 0
    out = capsys.readouterr().out
    assert "Instances: 0 to back up, 0 missing" in out
    assert f"(no targets: {reason})" in out
    assert "All DryRuns ok." in out
    assert await run_cli("plan", "untagged", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["no_targets"], doc["instances"], doc["ok"]) == (reason, [], True)


@pytest.mark.parametrize("sim_config", [replace(make_sim_config(), regions=(TEST_REGION,))])
async def test_plan_refused_region_names_policy_region_and_reason(
    cli_env: None, pg_pool: asyncpg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    """A region the API does not serve: one line naming policy, region and answer; exit 1."""
    await insert_tag_policy(pg_pool, "far", instance_tags={"backup": "daily"}, region="eu-nowhere")
    assert await run_cli("plan", "far") == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(
        "plan: the API refuses region 'eu-nowhere' of policy 'far' (account 'default'):"
        " InvalidParameterValue: A value specified in `Region` is not valid"
    )
    assert "Traceback" not in captured.err
