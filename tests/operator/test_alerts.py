"""The shipped alert rules and dashboard: their shape, their metrics, and the RPO alert firing.

Metric names are checked against a real daemon's /metrics. The rules file is checked for the
structure Prometheus loads (groups, rules, alert/expr/for/labels/annotations), and with
`promtool check rules` where promtool is installed (PATH, or the PROMTOOL variable). The
acceptance test runs the daemon on a fleet where one instance fails every slot, scrapes it and
evaluates the shipped RPO rule twice: with the tiny evaluator in `promql.py` at the scrape's
instant (the expression only, not `for:`), and, where promtool is installed, with Prometheus'
own engine in `promtool test rules` over the scraped samples held for 15 minutes (`for:`
included; timestamps re-based so the scrape is promtool's time 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml
from prometheus_client.samples import Sample

from orchestrator import pauses
from orchestrator.simulator.config import SimConfig, SimImageSeed
from orchestrator.simulator.runner import Simulator
from orchestrator.tencent.errors import TencentError
from tests.fixtures.daemon import DaemonProcess, config_toml, daemon_env
from tests.fixtures.engine import fast_settings
from tests.fixtures.operator import insert_image, insert_policy
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import TEST_REGION, make_sim_config
from tests.operator.promql import evaluate, instant, metric_names
from tests.operator.scrape import scrape
from tests.operator.seed import add_job, midnight

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "config" / "prometheus-alerts.yml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
JOB = "cvm-backup"
# Series Prometheus makes itself, not the daemon.
PROMETHEUS_OWN = frozenset({"up"})
RULE_KEYS = frozenset({"alert", "expr", "for", "keep_firing_for", "labels", "annotations"})
DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")
INSTANCE_TS = "cvm_backup_instance_last_success_timestamp_seconds"
RPO_ALERT = "CvmBackupInstanceBackupTooOld"
# What the issue asks the rules to cover: alert name -> a metric its expression must use.
COVERAGE = {
    RPO_ALERT: INSTANCE_TS,
    "CvmBackupJobsFailed": "cvm_backup_jobs_finished_total",
    "CvmBackupQuotaExhausted": "cvm_backup_jobs_finished_total",
    "CvmBackupAccountPaused": "cvm_backup_account_paused_since_timestamp_seconds",
    "CvmBackupDown": "up",
    "CvmBackupAbsent": "up",
    "CvmBackupThrottled": "cvm_backup_api_calls_total",
}
FAILING = 0  # the index in the fleet of the instance whose images always end CREATEFAILED
# Images that existed before the daemon ran: (instance index, days ago, image id).
HISTORY: tuple[tuple[int, int, str], ...] = (
    *((0, 5, "img-hist0001"), (1, 5, "img-hist0002"), (1, 1, "img-hist0003")),
    *((2, 5, "img-hist0004"), (2, 1, "img-hist0005")),
)


def _rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def _rule(name: str) -> dict[str, Any]:
    (rule,) = [r for r in _rules() if r.get("alert") == name]
    return rule


def _dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for panel in doc["panels"] for t in panel.get("targets", ())]


def _promtool() -> str | None:
    return os.environ.get("PROMTOOL") or shutil.which("promtool")


def _run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_rules_file_has_the_shape_prometheus_loads() -> None:
    """groups/rules with alert, expr, for, labels, annotations; names unique; the topics covered."""
    loaded = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    assert set(loaded) == {"groups"}
    names = []
    for group in loaded["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}
        assert isinstance(group["name"], str)
        for rule in group["rules"]:
            assert set(rule) <= RULE_KEYS, rule
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"]), rule
            assert isinstance(rule["expr"], str)
            assert metric_names(rule["expr"]), rule["expr"]
            assert DURATION.fullmatch(rule.get("for", "0s")), rule
            for key in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in rule.get(key, {}).values()), rule
            assert rule["labels"]["severity"] in ("critical", "warning")
            assert rule["annotations"]["summary"]
            names.append(rule["alert"])
    assert len(names) == len(set(names))
    for alert, metric in COVERAGE.items():
        assert metric in metric_names(_rule(alert)["expr"]), alert


@pytest.mark.skipif(_promtool() is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules() -> None:
    """`promtool check rules` (Prometheus' own parser) finds every rule valid."""
    done = _run_promtool(str(_promtool()), "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in done.stdout


def test_dashboard_has_the_shape_grafana_imports() -> None:
    """A dashboard with a uid, a Prometheus datasource variable and panels that query it."""
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert (doc["uid"], doc["title"]) == ("cvm-backup", "cvm-backup")
    assert isinstance(doc["schemaVersion"], int)
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert metric_names(target["expr"]), target
            assert 'job="$job"' in target["expr"], target


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def sim_config() -> SimConfig:
    """Five instances, the first making images that always end CREATEFAILED; past images listed."""
    base = make_sim_config()
    fleet = list(base.instances)
    fleet[FAILING] = replace(fleet[FAILING], behaviour="fail")
    now = datetime.now(UTC)
    seeds = tuple(
        SimImageSeed(
            image_id=image_id,
            name=f"seed-{image_id}",
            region=TEST_REGION,
            instance_id=fleet[index].instance_id,
            created_time=(now - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        for index, days, image_id in HISTORY
    )
    return replace(base, instances=tuple(fleet), images=(*base.images, *seeds))


async def _seed(pool: asyncpg.Pool, fleet: list[str]) -> None:
    """Five days ago all three worked; yesterday and every slot since, the first one failed."""
    policy = await insert_policy(pool, "web", fleet[:3])
    # Keep every image: retention would send deletes for ones only this database knows.
    await pool.execute("UPDATE policies SET keep_last = 100 WHERE id = $1", policy)
    now = datetime.now(UTC)
    for index, days, image_id in HISTORY:
        await insert_image(pool, policy, fleet[index], image_id, now - timedelta(days=days))
    for index in range(3):
        await add_job(pool, policy, fleet[index], midnight(5), "succeeded")
        failed = index == FAILING
        state, reason = ("failed", "image_failed") if failed else ("succeeded", "image_ready")
        await add_job(pool, policy, fleet[index], midnight(1), state, reason=reason)


@pytest.fixture
async def daemon(
    pg_dsn: str, pg_pool: asyncpg.Pool, simulator: Simulator, tmp_path: Path
) -> AsyncIterator[tuple[DaemonProcess, str]]:
    """`cvm-backup run` with its endpoint on a free loopback port; stopped with SIGTERM after."""
    address = f"127.0.0.1:{_free_port()}"
    settings = fast_settings(pg_dsn, simulator.url, metrics_address=address)
    config = config_toml(settings, tmp_path / "config.toml")
    process = DaemonProcess(daemon_env(pg_dsn, simulator.url, config, tmp_path), tmp_path / "log")
    await process.start("run")
    try:
        yield process, f"http://{address}"
    finally:
        if process.proc is not None and process.proc.returncode is None:
            process.proc.send_signal(signal.SIGTERM)
            try:
                await process.wait(within=20)
            except TimeoutError:
                await process.kill()


async def _today_done(pool: asyncpg.Pool, count: int) -> bool:
    found = await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE slot = $1 AND finished_at IS NOT NULL", midnight(0)
    )
    return int(found) == count


async def _scrape_when(
    http: aiohttp.ClientSession, url: str, ready: Iterable[str], within: float = 30
) -> list[Sample]:
    """Scrape until every name in `ready` has a sample (some are read in the background)."""
    async with asyncio.timeout(within):
        while True:
            try:
                samples = await scrape(http, url)
            except aiohttp.ClientConnectionError:
                samples = []  # not listening yet
            if set(ready) <= {s.name for s in samples}:
                return samples
            await asyncio.sleep(0.1)


async def test_every_metric_the_rules_and_dashboard_use_is_exported(
    daemon: tuple[DaemonProcess, str],
    pg_pool: asyncpg.Pool,
    http: aiohttp.ClientSession,
    instance_ids: list[str],
) -> None:
    """Each metric in the alerts and the dashboard is in a running daemon's /metrics."""
    _, url = daemon
    await _seed(pg_pool, instance_ids)
    # A copy destination, so the copies' series (and the rule on them) have samples too.
    copies = [{"region": "ap-shanghai", "keep_last": 100}]
    await pg_pool.execute("UPDATE policies SET copies = $1 WHERE name = 'web'", copies)
    # Three backups (one fails, as every slot), then a copy of each of the two good ones.
    await wait_for(lambda: _today_done(pg_pool, 5), within=60)
    refused = TencentError("AuthFailure.SecretIdNotFound", "no such key")
    async with pg_pool.acquire() as conn:
        # Probed in an hour: the pause stays while this test scrapes.
        await pauses.pause(
            conn,
            "default",
            refused,
            region=TEST_REGION,
            instance_id=instance_ids[3],
            first_probe=3600,
        )
    used = set().union(*(metric_names(r["expr"]) for r in _rules()))
    used |= set().union(*(metric_names(e) for e in _dashboard_exprs()))
    wanted = used - PROMETHEUS_OWN
    samples = await _scrape_when(http, url, wanted)
    exported = {s.name for s in samples}
    assert wanted <= exported, sorted(wanted - exported)
    assert any(name.startswith("cvm_backup_") for name in wanted)


def _render(template: str, labels: dict[str, str]) -> str:
    """Prometheus' {{ $labels.x }} substitution: all the RPO rule's annotations use."""
    return re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m.group(1)], template)


def _promtool_test(samples: list[Sample], now: float, target: str, fires: list[str]) -> str:
    """A `promtool test rules` file: the scrape held for 20 minutes, the RPO alert at 15."""
    names = metric_names(_rule(RPO_ALERT)["expr"])
    series = []
    for s in samples:
        if s.name not in names:
            continue
        value = s.value - now if s.name.endswith("_timestamp_seconds") else s.value
        labels = {**s.labels, "job": JOB, "instance": target}
        text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        series.append({"series": f"{s.name}{{{text}}}", "values": f"{value!r}x20"})
    rule = _rule(RPO_ALERT)
    alerts = []
    for instance_id in fires:
        labels = {"policy": "web", "instance_id": instance_id}
        alerts.append(
            {
                "exp_labels": {**rule["labels"], **labels},
                "exp_annotations": {k: _render(v, labels) for k, v in rule["annotations"].items()},
            }
        )
    test = {"interval": "1m", "input_series": series}
    test["alert_rule_test"] = [{"eval_time": "15m", "alertname": RPO_ALERT, "exp_alerts": alerts}]
    doc = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [test]}
    return yaml.safe_dump(doc, sort_keys=False)


async def _failing_fleet_scrape(
    daemon: tuple[DaemonProcess, str],
    pool: asyncpg.Pool,
    http: aiohttp.ClientSession,
    instance_ids: list[str],
) -> tuple[list[Sample], float]:
    """Run today's slot on the seeded history; the scrape after it and when it was taken."""
    _, url = daemon
    await _seed(pool, instance_ids)
    await wait_for(lambda: _today_done(pool, 3), within=60)
    rows = await pool.fetch("SELECT instance_id, state FROM jobs WHERE slot = $1", midnight(0))
    states = {row["instance_id"]: row["state"] for row in rows}
    failing, siblings = instance_ids[FAILING], instance_ids[1:3]
    assert states == {failing: "failed", **dict.fromkeys(siblings, "succeeded")}
    samples = await _scrape_when(http, url, [INSTANCE_TS])
    return samples, time.time()


async def test_an_instance_failing_every_slot_fires_the_rpo_alert(
    daemon: tuple[DaemonProcess, str],
    pg_pool: asyncpg.Pool,
    http: aiohttp.ClientSession,
    instance_ids: list[str],
) -> None:
    """Siblings back up, one instance fails each slot: it alone is stale, overdue and alerted."""
    samples, now = await _failing_fleet_scrape(daemon, pg_pool, http, instance_ids)
    failing, siblings = instance_ids[FAILING], instance_ids[1:3]
    ages = {s.labels["instance_id"]: now - s.value for s in samples if s.name == INSTANCE_TS}
    assert set(ages) == {failing, *siblings}
    assert 5 * 86400 - 600 < ages[failing] < 5 * 86400 + 600  # its last good image, 5 days old
    assert all(ages[i] < 600 for i in siblings)  # today's
    overdue = [s.value for s in samples if s.name == "cvm_backup_policy_instances_overdue"]
    assert overdue == [1]
    # The policy-wide gauge still looks fine: exactly what the per-instance one is for.
    newest = [s.value for s in samples if s.name == "cvm_backup_last_success_timestamp_seconds"]
    assert now - newest[0] < 600
    target = daemon[1].removeprefix("http://")
    fired = evaluate(_rule(RPO_ALERT)["expr"], instant(samples, job=JOB, instance=target), now)
    assert isinstance(fired, dict)
    assert [dict(labels)["instance_id"] for labels in fired] == [failing]


@pytest.mark.skipif(_promtool() is None, reason="promtool is not installed")
async def test_prometheus_fires_the_shipped_rpo_rule_on_that_scrape(
    daemon: tuple[DaemonProcess, str],
    pg_pool: asyncpg.Pool,
    http: aiohttp.ClientSession,
    instance_ids: list[str],
    tmp_path: Path,
) -> None:
    """promtool test rules, fed the scrape for 15 minutes: the alert fires for that one instance."""
    samples, now = await _failing_fleet_scrape(daemon, pg_pool, http, instance_ids)
    promtool, target = str(_promtool()), daemon[1].removeprefix("http://")
    spec = tmp_path / "rpo-test.yml"
    spec.write_text(_promtool_test(samples, now, target, [instance_ids[FAILING]]), "utf-8")
    done = await asyncio.to_thread(_run_promtool, promtool, "test", "rules", str(spec))
    assert done.returncode == 0, done.stdout + done.stderr
    # And the same file expecting no alert fails: promtool did evaluate the rule.
    spec.write_text(_promtool_test(samples, now, target, []), encoding="utf-8")
    wrong = await asyncio.to_thread(_run_promtool, promtool, "test", "rules", str(spec))
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
