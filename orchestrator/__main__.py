"""`python -m orchestrator` is the same as the `cvm-backup` command."""

from __future__ import annotations

from orchestrator.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
