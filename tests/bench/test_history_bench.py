"""`cvm-backup bench --only history --quick`: every figure is measured, printed and written."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest
import structlog

from orchestrator import cli
from orchestrator.bench.history import FIGURES
from orchestrator.cli import build_parser
from orchestrator.commands.bench import options_from
from orchestrator.errors import UsageError

PRINTED = (
    "claim (median)",
    "claim (p95)",
    "status --json",
    "metrics scrape",
    "retention sweep",
    "database size",
    "jobs rows",
    "events rows",
    "images rows",
    "pruning to history_days=",
    "retention decisions unchanged: True",
)


@pytest.fixture(scope="module")
def history_run(
    pg_admin_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, dict[str, Any], str]:
    """One quick history bench on the test Postgres: exit code, JSON document, printed table."""
    out = tmp_path_factory.mktemp("bench-history") / "bench.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CVM_BACKUP_DATABASE_URL", pg_admin_dsn)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = cli.main(["bench", "--only", "history", "--quick", "--out", str(out)])
    structlog.reset_defaults()
    return code, json.loads(out.read_text(encoding="utf-8")), printed.getvalue()


def test_history_bench_prints_every_figure(history_run: tuple[int, dict[str, Any], str]) -> None:
    """Exit 0, and the table has each figure, both sizes and the pruning pass."""
    code, doc, printed = history_run
    assert code == 0, doc["results"]
    for text in PRINTED:
        assert text in printed, printed
    # Only the history table: the fleet scenarios did not run.
    assert "CreateImage utilization" not in printed


def test_history_bench_judges_each_ratio(history_run: tuple[int, dict[str, Any], str]) -> None:
    """Each of claim, status, scrape and sweep has both timings, a ratio and a verdict."""
    _, doc, _ = history_run
    result = doc["results"]["history"]
    assert [t["name"] for t in result["targets"]] == [label for _, label in FIGURES]
    for target in result["targets"]:
        assert isinstance(target["measured"], float), target
        assert isinstance(target["met"], bool), target
    for side in ("empty", "history"):
        figures = result[side]["figures"]
        for key, _ in FIGURES:
            assert figures[key]["median_ms"] > 0, (side, key)
        assert figures["status"]["rows"] == result["instances"]
        assert figures["sweep"]["pairs"] == result["instances"]
        assert figures["sweep"]["deleted"] == 0
        assert result[side]["database_bytes"] > 0


def test_history_bench_has_more_history_and_prunes_it(
    history_run: tuple[int, dict[str, Any], str],
) -> None:
    """The history side holds every day's rows; the pruning pass removes some, decisions hold."""
    _, doc, _ = history_run
    result = doc["results"]["history"]
    empty, full = result["empty"]["generated"]["rows"], result["history"]["generated"]["rows"]
    assert full["jobs"] == result["instances"] * (result["days"] + 1)
    assert full["live_images"] == empty["live_images"]
    assert full["events"] > empty["events"]
    prune = result["history"]["prune"]
    assert all(n > 0 for n in prune["deleted"].values()), prune
    assert prune["idle_pass_deleted"] == 0
    assert prune["decisions_unchanged"] is True
    assert prune["rows_left"]["live_images"] == full["live_images"]


@pytest.mark.parametrize(
    ("flag", "value", "reason"),
    [
        ("--history-span", "39", "--history-span must be 40 to 3650 days"),
        ("--history-span", "3651", "--history-span must be 40 to 3650 days"),
        ("--history-instances", "0", "--history-instances must be 1 to 100000"),
        ("--history-instances", "100001", "--history-instances must be 1 to 100000"),
    ],
)
def test_history_sizes_out_of_bounds_are_refused(flag: str, value: str, reason: str) -> None:
    """A size past its bound is a usage error naming the flag, before anything is written."""
    parsed = build_parser().parse_args(["bench", "--only", "history", flag, value])
    with pytest.raises(UsageError, match=reason):
        options_from(parsed)
