"""Command-line commands, one module per group; see `orchestrator.cli`."""

from __future__ import annotations
