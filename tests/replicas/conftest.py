"""Replica tests reuse the engine fixtures (an engine context, captured logs)."""

from __future__ import annotations

from tests.engine.conftest import captured_logs, engine_ctx

__all__ = ["captured_logs", "engine_ctx"]
