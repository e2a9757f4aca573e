"""The event list in the README and docs/events.md cover what the code logs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _logged_events() -> set[str]:
    pattern = re.compile(r"log\.(?:debug|info|warning|error|exception)\(\s*\"([a-z_]+\.[a-z_.]+)\"")
    found: set[str] = set()
    for path in (ROOT / "orchestrator").rglob("*.py"):
        if "simulator" in path.parts or "bench" in path.parts or "demo" in path.parts:
            continue
        found |= set(pattern.findall(path.read_text(encoding="utf-8")))
    return found


def test_every_engine_event_is_documented() -> None:
    """Each dotted event the daemon logs appears in docs/events.md."""
    documented = (ROOT / "docs" / "events.md").read_text(encoding="utf-8")
    missing = {e for e in _logged_events() if f"`{e}`" not in documented}
    # `*.delete_failed` documents the family of delete failures in one row.
    missing = {e for e in missing if not e.endswith(".delete_failed")}
    assert not missing, sorted(missing)


def test_readme_lists_the_events() -> None:
    """The README names the main job, image and quota events."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for event in ("job.claimed", "job.retry_scheduled", "image.ready", "quota.exhausted"):
        assert f"`{event}`" in readme
