"""The report: targets beside the measured values (never asserted), the side-by-side table."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Results = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Target:
    """One goal from the issue: where its value is in the results, and how it is judged."""

    name: str
    path: tuple[str, ...]
    text: str
    bound: float
    compare: Callable[[float, float], bool]
    unit: str = ""


TARGETS = (
    Target("CreateImage utilization", ("fleet", "utilization"), ">= 0.97", 0.97, operator.ge),
    Target("throttled calls (fleet)", ("fleet", "api", "throttled"), "0", 0, operator.eq),
    Target("completion / lower bound", ("fleet", "completion_ratio"), "<= 1.05", 1.05, operator.le),
    Target(
        "full-quota slot / roomy slot", ("quota", "completion_ratio"), "<= 1.5", 1.5, operator.le
    ),
    Target("deletions beyond the deficit", ("quota", "extra_deletions"), "0", 0, operator.eq),
    Target("throttled calls (copies)", ("copies", "api", "throttled"), "0", 0, operator.eq),
    Target("engine ceiling", ("ceiling", "jobs_per_second"), ">= 500", 500, operator.ge, " jobs/s"),
    Target("peak RSS", ("memory", "peak_rss_mb"), "< 150", 150, operator.lt, " MB"),
    Target(
        "first call after slot", ("fleet", "first_call", "seconds"), "< 1", 1, operator.lt, " s"
    ),
)


def lookup(results: Results, path: tuple[str, ...]) -> Any:
    """The value at `path`, or None when a scenario did not run or did not produce it."""
    value: Any = results
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def judge(results: Results) -> list[dict[str, Any]]:
    """Every target with its measured value and whether it was met (None: not measured)."""
    judged = []
    for target in TARGETS:
        value = lookup(results, target.path)
        met = None if not isinstance(value, int | float) else target.compare(value, target.bound)
        judged.append(
            {
                "name": target.name,
                "target": target.text + target.unit,
                "measured": value,
                "met": met,
            }
        )
    return judged


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "not measured"}[met]


def _cells(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def targets_table(results: Results) -> str:
    """Measured value, target, verdict, one line per target."""
    rows = [("metric", "measured", "target", "")]
    for target, judged in zip(TARGETS, judge(results), strict=True):
        value = judged["measured"]
        shown = "-" if value is None else f"{value}{target.unit}"
        rows.append((target.name, shown, judged["target"], _verdict(judged["met"])))
    return _cells(rows)


def _pair(result: Any) -> tuple[str, str, str]:
    """(backed up, throttled, time) of one contender, or why it did not run."""
    if not isinstance(result, Mapping):
        return ("-", "-", "-")
    if "error" in result:
        return ("error (see JSON)", "", "")
    if "skipped" in result:
        return ("skipped", "", "")
    done = f"{result['backed_up']}/{result['instances']}"
    took = result.get("seconds", result.get("completion_seconds"))
    return (done, str(result["api"]["throttled"]), f"{took} s")


def versus_table(results: Results) -> str:
    """The sequential SDK loop beside cvm-backup, clean and with faults."""
    runs = [
        ("clean", "SDK loop", ("baseline",)),
        ("clean", "cvm-backup", ("fleet",)),
        ("faults", "SDK loop", ("faults", "baseline")),
        ("faults", "SDK loop + sleep(0.1)", ("faults", "baseline_paced")),
        ("faults", "cvm-backup", ("faults", "cvm_backup")),
    ]
    rows = [("fleet", "contender", "backed up", "throttled", "time")]
    rows.extend((label, who, *_pair(lookup(results, path))) for label, who, path in runs)
    return _cells(rows) + "\n" + VERSUS_NOTE


VERSUS_NOTE = (
    "(time: SDK loop from its first call until its images are built; cvm-backup from the run's "
    "creation (clean: from the slot) until its last job is recorded. Throttled answers come "
    "back without the simulated latency, so the unpaced loop finishes sooner than it would "
    "on a real network; it is throttled just the same.)"
)


VERSUS_NOTE = (
    "time: the SDK loop from its first call until its images are built; cvm-backup from the\n"
    "run's creation (clean: from the slot) until its last job is recorded. Throttled answers\n"
    "come back without the simulated latency, so the unpaced loop ends sooner than it would\n"
    "on a real network; it is throttled just the same."
)


def write(document: Mapping[str, Any], path: Path) -> Path:
    """Write the JSON document, creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    return path
