"""`cvm-backup bench --quick` at tiny sizes: every scenario runs and the JSON has its shape."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import structlog

from orchestrator import cli

TINY = [
    "--quick",
    "--instances",
    "6",
    "--ceiling-jobs",
    "30",
    "--memory-jobs",
    "120",
    "--memory-seconds",
    "0.5",
    "--busy-share",
    "0.34",
]
TARGET_NAMES = {
    "CreateImage utilization",
    "throttled calls (fleet)",
    "throttled calls (copies)",
    "completion / lower bound",
    "engine ceiling",
    "peak RSS",
    "first call after slot",
    "full-quota slot / roomy slot",
    "deletions beyond the deficit",
}


@pytest.fixture(scope="module")
def bench_run(
    pg_admin_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, dict[str, Any], str]:
    """One tiny bench run on the test Postgres: exit code, JSON document, printed output."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CVM_BACKUP_DATABASE_URL", pg_admin_dsn)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = cli.main(["bench", *TINY, "--out", str(out)])
    structlog.reset_defaults()
    return code, json.loads(Path(out).read_text(encoding="utf-8")), printed.getvalue()


def test_bench_exits_zero_and_judges_every_target(
    bench_run: tuple[int, dict[str, Any], str],
) -> None:
    """Every scenario is measured and each target is reported with a value and a verdict."""
    code, doc, printed = bench_run
    assert code == 0, doc["results"]
    assert {t["name"] for t in doc["targets"]} == TARGET_NAMES
    for target in doc["targets"]:
        assert isinstance(target["measured"], int | float), target
        assert isinstance(target["met"], bool), target
    for name in TARGET_NAMES:
        assert name in printed
    assert "SDK loop" in printed
    assert "cvm-backup" in printed


def test_bench_records_each_scenario(bench_run: tuple[int, dict[str, Any], str]) -> None:
    """Fleet, baseline, faults, quota, ceiling and memory results carry their key figures."""
    _, doc, _ = bench_run
    results = doc["results"]
    assert set(results) == {"baseline", "fleet", "faults", "quota", "copies", "ceiling", "memory"}
    copies = results["copies"]
    assert copies["copies"] == copies["instances"]
    assert copies["jobs"] == {"succeeded": 2 * copies["instances"]}
    assert copies["normal_to_copy_normal_seconds"]["median"] > 0
    assert copies["api"]["violations"] == {}
    fleet = results["fleet"]
    assert fleet["instances"] == 6
    assert fleet["create_calls"] >= 6
    assert fleet["first_call"]["from"] == "daemon start"
    quota = results["quota"]
    assert (quota["roomy"]["deficit"], quota["full"]["deficit"]) == (0, 6)
    assert quota["roomy"]["jobs"] == quota["full"]["jobs"] == {"succeeded": 6}
    assert quota["full"]["backed_up"] == 6
    assert results["ceiling"]["jobs"] == 30
    assert results["memory"]["jobs"] == 120
    assert results["memory"]["peak_rss_mb"] >= results["memory"]["idle"]["rss_mb"]
    assert doc["database"]["kind"] == "external"
    # A user without a password is shown as is; a password would be starred out.
    userinfo = doc["database"]["dsn"].split("://", 1)[1].rpartition("@")[0]
    assert userinfo.partition(":")[2] in {"", "***"}


def test_cvm_backup_backs_up_every_instance_the_sdk_loop_may_miss(
    bench_run: tuple[int, dict[str, Any], str],
) -> None:
    """With faults injected, cvm-backup leaves no instance without a backup and no duplicate."""
    _, doc, _ = bench_run
    faults = doc["results"]["faults"]
    ours, sdk = faults["cvm_backup"], faults["baseline"]
    assert faults["faults"]["busy_instances"] >= 1
    assert ours["without_backup"] == 0
    assert ours["api"]["duplicates"] == 0
    assert ours["api"]["throttled"] == 0
    assert sdk["backed_up"] + sdk["without_backup"] == sdk["instances"] == 6
    assert faults["baseline_paced"]["pause"] > 0
    assert doc["results"]["fleet"]["backed_up"] == 6
