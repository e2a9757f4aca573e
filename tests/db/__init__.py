"""Tests of the database layer: migrations, schema constraints, policies, embedded Postgres."""

from __future__ import annotations
