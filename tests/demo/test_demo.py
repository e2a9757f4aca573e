"""`cvm-backup demo --fast` end to end in a subprocess: exit code, summary, nothing left behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.pg import run_sql

ROW = re.compile(r"^  (?P<label>[a-zA-Z: ()-]+?)\s+(?P<a>\d+)\s+(?P<b>\d+)\s+(?P<total>\d+)$")
ENDINGS = ("backed up", "failed", "skipped", "expired")
# A DSN that would fail if used: the demo must ignore it (it has its own database).
UNREACHABLE_DSN = "postgresql://nobody:pw@127.0.0.1:1/not-used"


@dataclass(frozen=True)
class DemoRun:
    """What one demo process did."""

    code: int
    stdout: str
    stderr: str
    summary: dict[str, Any]
    root: Path

    @property
    def log(self) -> Path:
        """Where the daemon log must be by default."""
        return self.root / "home" / "demo" / "demo.log"


def demo_env(root: Path) -> dict[str, str]:
    """A user's environment: own home, own temp dir, and a DSN the demo must not use."""
    (root / "home").mkdir(exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    return {
        **os.environ,
        "CVM_BACKUP_HOME": str(root / "home"),
        "TMPDIR": str(root / "tmp"),
        "CVM_BACKUP_DATABASE_URL": UNREACHABLE_DSN,
        "DATABASE_URL": UNREACHABLE_DSN,
    }


def run_cli(root: Path, *args: str, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    """`python -m orchestrator demo ARGS` with the environment of `demo_env`."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "demo", *args],
        env=demo_env(root),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """One fast demo run, shared by the tests below."""
    root = tmp_path_factory.mktemp("demo")
    done = run_cli(root, "--fast", "--json", str(root / "summary.json"))
    summary = json.loads((root / "summary.json").read_text()) if done.returncode == 0 else {}
    return DemoRun(done.returncode, done.stdout, done.stderr, summary, root)


def table(stdout: str) -> dict[str, tuple[int, int, int]]:
    """The summary table: row label -> (slot 1, slot 2, total)."""
    rows = {}
    for line in stdout.splitlines():
        if match := ROW.match(line):
            rows[match["label"]] = (int(match["a"]), int(match["b"]), int(match["total"]))
    return rows


def postgres_processes_under(path: Path) -> list[str]:
    """Command lines of running postgres processes whose arguments mention `path`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, UnicodeDecodeError):
            continue
        if "postgres" in cmdline and str(path) in cmdline:
            found.append(cmdline)
    return found


def test_demo_exits_zero_with_a_summary(demo: DemoRun) -> None:
    """The fast demo exits 0 and prints both slots, the summary and the invariants."""
    assert demo.code == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    for text in ("Slot 1 of 2", "Slot 2 of 2", "Summary (", "Invariants ("):
        assert text in demo.stdout


def test_every_job_is_accounted_for(demo: DemoRun) -> None:
    """Per slot and in total, jobs = backed up + failed + skipped + expired; totals add up."""
    rows = table(demo.stdout)
    assert rows["jobs"][0] == rows["jobs"][1] > 0
    for column in range(3):
        assert rows["jobs"][column] == sum(rows[name][column] for name in ENDINGS)
    for a, b, total in rows.values():
        assert a + b == total
    assert rows["backed up"][2] > 0


def test_summary_text_and_json_agree(demo: DemoRun) -> None:
    """The --json summary holds the same numbers as the printed table."""
    rows = table(demo.stdout)
    slots = demo.summary["slots"]
    for label, (a, b, _) in rows.items():
        assert (slots[0][label], slots[1][label]) == (a, b), label


def test_retries_and_quota_rotation_really_happen(demo: DemoRun) -> None:
    """Slot 2 hits the small quota and rotates; transient faults and busy instances retry."""
    rows = table(demo.stdout)
    assert rows["deleted: quota rotation"][1] > 0
    assert rows["retried (jobs)"][2] > 0
    causes = {c["code"]: c["attempts"] for c in demo.summary["retry_causes"]}
    assert causes.get("ImageQuotaLimitExceeded", 0) > 0, causes
    assert causes.get("OperationDenied.InstanceOperationInProgress", 0) > 0, causes


def test_failures_and_skips_carry_their_reasons(demo: DemoRun) -> None:
    """CREATEFAILED images fail their jobs with the code; the missing explicit id is skipped."""
    failed = demo.summary["failed"]
    assert sum(f["count"] for f in failed) >= 1
    assert all(f["reason"] != "-" and f["code"] for f in failed), failed
    assert any(f["code"] == "ImageCreateFailed" for f in failed), failed
    skipped = demo.summary["skipped"]
    assert sum(s["count"] for s in skipped) >= 1
    assert any(s["reason"] == "instance_gone" and "ins-decom001" in s["instances"] for s in skipped)
    assert "ImageCreateFailed" in demo.stdout
    assert "instance_gone" in demo.stdout


def test_invariants_hold(demo: DemoRun) -> None:
    """No rate-limit violation, no duplicate, no foreign deletion, every job terminal."""
    checks = {c["name"]: c for c in demo.summary["checks"]}
    for name in (
        "rate-limit violations",
        "duplicate images",
        "deletions of images not ours",
        "jobs not in a terminal state",
    ):
        assert checks[name]["value"] == 0, checks[name]
    assert all(c["ok"] for c in checks.values()), checks
    assert demo.summary["ok"] is True
    assert not re.search(r"^  FAIL ", demo.stdout, re.MULTILINE)
    assert len(re.findall(r"^  ok   ", demo.stdout, re.MULTILINE)) == len(checks)


def test_nothing_is_left_behind(demo: DemoRun) -> None:
    """The private Postgres ran under the temp dir, and neither it nor the directory remains."""
    tmp = demo.root / "tmp"
    assert f"embedded Postgres in {tmp}/cvm-backup-demo-" in demo.stdout
    assert postgres_processes_under(tmp) == []
    assert not list(tmp.glob("cvm-backup-demo-*"))


def test_daemon_logs_go_to_the_demo_log(demo: DemoRun) -> None:
    """Structured events land in $CVM_BACKUP_HOME/demo/demo.log, named in the output."""
    assert str(demo.log) in demo.stdout
    events = [json.loads(line)["event"] for line in demo.log.read_text().splitlines()]
    assert "daemon.started" in events
    assert "job.succeeded" in events
    assert '"event"' not in demo.stdout


def test_demo_refuses_a_database_already_in_use(pg_dsn: str, tmp_path: Path) -> None:
    """--database-url must be a scratch database: one holding policies is refused (exit 2)."""
    run_sql(
        pg_dsn,
        "INSERT INTO policies (name, region, schedule, instance_ids, keep_last)"
        " VALUES ('mine', 'ap-guangzhou', '0 3 * * *', '{ins-abc}', 7)",
    )
    done = run_cli(tmp_path, "--fast", "--database-url", pg_dsn, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "already holds policies or runs" in done.stderr
    names = [r["name"] for r in run_sql(pg_dsn, "SELECT name FROM policies")]
    assert names == ["mine"]


def test_demo_runs_in_a_given_scratch_database(pg_dsn: str, tmp_path: Path) -> None:
    """With --database-url the demo uses that database (no embedded server) and keeps its data."""
    done = run_cli(tmp_path, "--fast", "--database-url", pg_dsn)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the one given with --database-url" in done.stdout
    assert "embedded Postgres" not in done.stdout
    policies = {r["name"] for r in run_sql(pg_dsn, "SELECT name FROM policies")}
    assert policies == {"fleet-hourly", "db-extra"}
    slots = run_sql(pg_dsn, "SELECT count(DISTINCT slot) AS n FROM jobs")
    assert slots[0]["n"] == 2
