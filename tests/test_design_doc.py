"""docs/design.md can be looked up: its module map is true and complete, and comments cite it."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
TEXT = DESIGN.read_text(encoding="utf-8")

# Documents that were never in the repository: a comment says the thing or cites docs/design.md.
OUTSIDE = ("DESIGN §", "reference §", "style anchors", "seed 002", "../shared")
# Where comments and docstrings live. docs/design.md is left out: it explains the old citations.
SCANNED = ("orchestrator", "tests", "migrations", "config", "bench", "scripts", "docs")
SELF = Path(__file__).resolve()
# Repository paths a backticked name may start with; each must exist.
_PATH = re.compile(r"`((?:orchestrator|migrations|config|docs|tests|scripts|bench)/[^`\s]*)`")
_DOTTED = re.compile(r"`(orchestrator(?:\.[a-z_][a-z0-9_]*)+)`")
_MIGRATION = re.compile(r"`(\d{4}_[a-z0-9_]+)`")
_LINK = re.compile(r"design\.md#([a-z0-9-]+)")


def _section(title: str) -> str:
    """The text of the `## title` section, up to the next `## ` heading."""
    start = TEXT.index(f"\n## {title}\n")
    end = TEXT.find("\n## ", start + 1)
    return TEXT[start : end if end != -1 else len(TEXT)]


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors() -> set[str]:
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", TEXT, flags=re.MULTILINE)}


def _files() -> Iterator[Path]:
    """Every text file under the scanned folders (links such as orchestrator/migrations skipped)."""
    for top in SCANNED:
        for folder, dirs, names in os.walk(ROOT / top):
            here = Path(folder)
            dirs[:] = [d for d in dirs if d != "__pycache__" and not (here / d).is_symlink()]
            for name in names:
                path = here / name
                if path.resolve() in (SELF, DESIGN) or path.is_symlink():
                    continue
                data = path.read_bytes()
                if b"\0" not in data:
                    yield path


def _exempt() -> set[tuple[str, str]]:
    """(file, citation) pairs the "Older citations" table explains: applied, checksummed files."""
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|", _section("Older citations"), re.MULTILINE)
    return {(path, cite) for path, cite in rows}


def test_every_module_the_design_names_exists() -> None:
    """Each backticked orchestrator path, dotted module and migration in the page exists."""
    missing = [p for p in _PATH.findall(TEXT) if not (ROOT / p.split("#")[0]).exists()]
    missing += [m for m in _DOTTED.findall(TEXT) if importlib.util.find_spec(m) is None]
    shipped = {p.stem for p in (ROOT / "migrations").glob("*.sql")}
    missing += [m for m in _MIGRATION.findall(TEXT) if m not in shipped]
    assert not missing, missing


def test_module_map_covers_every_module_and_package() -> None:
    """Every orchestrator/*.py and every orchestrator/*/ package has its place in the module map."""
    mapped = _section("Module map")
    package = ROOT / "orchestrator"
    wanted = [f"orchestrator/{p.name}" for p in sorted(package.glob("*.py"))]
    packages = [p for p in sorted(package.iterdir()) if (p / "__init__.py").is_file()]
    wanted += [f"orchestrator/{p.name}/" for p in packages]
    absent = [w for w in wanted if f"`{w}" not in mapped]
    assert not absent, absent


def test_module_map_lists_the_daemon_loops() -> None:
    """The loops table names each task the daemon starts, with its module."""
    loops = _section("Module map")
    for task in ("scheduler", "dispatcher", "heartbeat", "tracker", "sweeper", "prober"):
        assert f"\n| {task} | `orchestrator/" in loops, task
    for task in ("retention sweep", "reconcile", "history", "notify", "health and metrics"):
        assert f"\n| {task} | `orchestrator/" in loops, task
    assert "\n| account leases | `orchestrator/accounts.py`" in loops


def test_no_comment_cites_a_document_outside_the_repository() -> None:
    """No file cites DESIGN §, reference §, style anchors, seed 002 or ../shared."""
    exempt = _exempt()
    found = []
    for path in _files():
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for cite in OUTSIDE:
                if cite in line and not any(rel == f and c in line for f, c in exempt):
                    found.append(f"{rel}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_older_citations_are_only_in_applied_migrations() -> None:
    """Each citation the page explains is one a shipped migration still carries."""
    for path, cite in _exempt():
        assert path.startswith("migrations/"), path
        assert cite in (ROOT / path).read_text(encoding="utf-8"), (path, cite)


def test_links_into_the_design_page_resolve() -> None:
    """Every design.md#anchor cited in the repository, and every #anchor in the page, exists."""
    anchors = _anchors()
    cited: list[tuple[str, str]] = []
    sources = [*_files(), ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    for path in sources:
        for anchor in _LINK.findall(path.read_text(encoding="utf-8", errors="replace")):
            cited.append((path.relative_to(ROOT).as_posix(), anchor))
    cited += [("docs/design.md", a) for a in re.findall(r"\]\(#([a-z0-9-]+)\)", TEXT)]
    broken = [(where, anchor) for where, anchor in cited if anchor not in anchors]
    assert not broken, broken


def test_contributing_names_every_test_folder() -> None:
    """CONTRIBUTING.md describes each folder under tests/ and the one command for every check."""
    guide = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    folders = [p.name for p in (ROOT / "tests").iterdir() if (p / "__init__.py").is_file()]
    absent = [f for f in folders if f"`tests/{f}/`" not in guide]
    assert not absent, absent
    assert "scripts/check" in guide
    assert (ROOT / "scripts" / "check").is_file()
