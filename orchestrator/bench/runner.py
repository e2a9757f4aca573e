"""Runs the selected scenarios in order, then prints the tables and writes the JSON document.

A scenario that cannot be measured (the daemon died, never drained) is recorded with its error
and the others still run; the command then exits 1. Missed targets are reported, not failed.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from orchestrator import __version__
from orchestrator.bench import report
from orchestrator.bench.ceiling import engine_ceiling
from orchestrator.bench.copies import copies_at_limit
from orchestrator.bench.database import BenchDatabase, bench_database
from orchestrator.bench.fleet import fleet_at_limit
from orchestrator.bench.harness import BenchError, Env
from orchestrator.bench.history import history_at_scale
from orchestrator.bench.history import table as history_table
from orchestrator.bench.memory import memory_at_scale
from orchestrator.bench.options import Options
from orchestrator.bench.quota import quota_rotation
from orchestrator.bench.versus import baseline_clean, with_faults

Scenario = Callable[[Env], Awaitable[dict[str, Any]]]

SCENARIOS: Mapping[str, tuple[str, Scenario]] = {
    "baseline": ("sequential SDK loop, clean fleet", baseline_clean),
    "fleet": ("cvm-backup at the real limit", fleet_at_limit),
    "faults": ("SDK loop and cvm-backup with faults", with_faults),
    "quota": ("a full-quota slot beside the same slot with room", quota_rotation),
    "copies": ("a copy of each backup in another region", copies_at_limit),
    "ceiling": ("engine ceiling, limits lifted", engine_ceiling),
    "memory": ("peak RSS with many jobs", memory_at_scale),
    "history": ("a year of history beside none", history_at_scale),
}


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _one(env: Env, name: str) -> dict[str, Any]:
    title, scenario = SCENARIOS[name]
    _say(f"bench: {name}: {title} ...")
    started = time.monotonic()
    try:
        result = await scenario(env)
    except BenchError as exc:
        result = {"error": str(exc)}
    took = time.monotonic() - started
    _say(f"bench: {name}: {'failed' if 'error' in result else 'done'} in {took:.1f} s")
    return {**result, "bench_seconds": round(took, 1)}


def _selected(options: Options) -> list[str]:
    names = [n for n in options.scenarios if n in SCENARIOS]
    return [n for n in names if options.baseline or n != "baseline"]


def _host() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cvm_backup": __version__,
    }


async def _document(options: Options, db: BenchDatabase, results: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": " ".join(["cvm-backup", *sys.argv[1:]]) if sys.argv else "cvm-backup bench",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": _host(),
        "database": await db.describe(),
        "options": {**asdict(options), "out": str(options.out)},
        "targets": report.judge(results),
        "results": results,
    }


async def run(options: Options, *, database_url: str | None, logs_dir: Path | None) -> int:
    """Every selected scenario; prints the tables, writes the JSON; 1 if a scenario failed."""
    workdir = logs_dir or Path(tempfile.mkdtemp(prefix="cvmbk-bench-logs-"))
    results: dict[str, Any] = {}
    try:
        async with bench_database(database_url) as db:
            env = Env(options, db, workdir)
            for name in _selected(options):
                results[name] = await _one(env, name)
            document = await _document(options, db, results)
    finally:
        if logs_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    path = report.write(document, options.out)
    # The history scenario has its own table; the others share the two below.
    if set(results) - {"history"}:
        print(report.targets_table(results))
        print()
        print(report.versus_table(results))
    if "history" in results:
        print(history_table(results["history"]))
    print(f"\nresults: {path}")
    return 1 if any("error" in r for r in results.values()) else 0
