"""The README's promises: its two opening commands, its command table, its examples."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg

from orchestrator import cli, policies

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_opens_with_the_demo_then_the_test_command() -> None:
    """The first two sh blocks are the demo and, under a Test heading, the CI command."""
    first, second = _blocks("sh")[:2]
    assert first.strip() == "pip install . && cvm-backup demo"
    heading = README[: README.index(second)].rstrip().rsplit("\n## ", 1)[-1]
    assert "test" in heading.lower()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert second.strip() in ci.splitlines()


def test_every_command_in_the_table_exists() -> None:
    """Each `cvm-backup X` named in the README is a registered subcommand."""
    named = set(re.findall(r"`cvm-backup ([a-z-]+)", README))
    known = {name for name in named if _is_command(name)}
    assert named == known, named - known


def _is_command(name: str) -> bool:
    try:
        cli.build_parser().parse_args([name, "--help"])
    except SystemExit as exc:
        return exc.code == 0
    return False


def test_readme_policy_example_is_valid() -> None:
    """The TOML policy shown in the README passes validation."""
    (toml,) = _blocks("toml")
    (policy,) = policies.parse_text(toml, "README.md")
    assert policy.name == "web-nightly"


async def test_readme_sql_examples_run(pg_pool: asyncpg.Pool) -> None:
    """The plain-SQL policy insert and the events query shown in the README work as written."""
    insert, query = _blocks("sql")
    await pg_pool.execute(insert)
    assert await pg_pool.fetchval("SELECT count(*) FROM policies WHERE name = 'app-daily'") == 1
    assert await pg_pool.fetch(query) == []
