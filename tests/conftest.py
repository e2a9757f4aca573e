"""Test configuration: fixture plugins and a network guard."""

from __future__ import annotations

import os

# Tests talk only to loopback; the official SDK reads proxy variables itself
# (docs/design.md#proxy-variables).
for _var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    os.environ.pop(_var, None)

# Modules of tests/fixtures that define fixtures; the others hold plain helpers to import.
pytest_plugins = [
    "tests.fixtures.pg",
    "tests.fixtures.sim",
    "tests.fixtures.engine",
    "tests.fixtures.logs",
]
