"""A scrape's database reads cost the live rows, not the history: no query scans the old jobs."""

from __future__ import annotations

import json
import time
from typing import Any

import asyncpg

from orchestrator import metrics
from tests.fixtures.sim import TEST_REGION

INSTANCES = 200
DAYS = 365
BIG_TABLES = ("jobs", "runs", "images", "events")

# A year of daily backups of INSTANCES instances, as plain SQL: every job finished, every image
# but each instance's newest seven deleted by retention, today's run still going.
_HISTORY = """
WITH p AS (
    INSERT INTO policies (name, region, schedule, instance_ids, keep_last, completion_window)
    SELECT 'web', $1, '0 0 * * *', ARRAY(SELECT 'ins-' || lpad(i::text, 8, '0')
                                          FROM generate_series(1, $2) AS i), 7, '2 days'
    RETURNING id
), r AS (
    INSERT INTO runs (policy_id, slot, state, completed_at)
    SELECT p.id, date_trunc('day', now()) - make_interval(days => d),
           CASE WHEN d = 0 THEN 'running' ELSE 'completed' END,
           CASE WHEN d = 0 THEN NULL ELSE now() END
    FROM p, generate_series(0, $3 - 1) AS d
    RETURNING id, policy_id, slot
)
INSERT INTO jobs (run_id, policy_id, account, region, instance_id, slot, image_name, deadline,
                  state, image_id, reason, finished_at)
SELECT r.id, r.policy_id, 'default', $1, 'ins-' || lpad(i::text, 8, '0'), r.slot,
       'cvmbk-web-' || i || '-' || to_char(r.slot, 'YYYYMMDD'), r.slot + interval '2 days',
       CASE WHEN r.slot = date_trunc('day', now()) THEN 'pending' ELSE 'succeeded' END,
       CASE WHEN r.slot = date_trunc('day', now()) THEN NULL ELSE 'img-' || r.id || '-' || i END,
       CASE WHEN r.slot = date_trunc('day', now()) THEN NULL ELSE 'image_ready' END,
       CASE WHEN r.slot = date_trunc('day', now()) THEN NULL ELSE r.slot + interval '5 minutes' END
FROM r, generate_series(1, $2) AS i
"""

_IMAGES = """
INSERT INTO images (image_id, name, account, region, instance_id, policy_id, slot, job_id, state,
                    created_at, delete_requested_at, delete_reason, deleted_at)
SELECT j.image_id, j.image_name, j.account, j.region, j.instance_id, j.policy_id, j.slot, j.id,
       'NORMAL', j.slot, old, CASE WHEN old IS NULL THEN NULL ELSE 'retention' END, old
FROM (SELECT *, CASE WHEN slot < now() - interval '8 days' THEN slot + interval '8 days' END AS old
      FROM jobs WHERE image_id IS NOT NULL) AS j
"""


async def _plan(conn: Any, query: str, *args: Any) -> list[dict[str, Any]]:
    found = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {query}", *args)
    # The pool may decode json itself (a codec), or hand back the text.
    plan: list[dict[str, Any]] = json.loads(found) if isinstance(found, str) else found
    return plan


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node]
    for child in node.get("Plans", ()):
        found += _nodes(child)
    return found


async def test_no_metrics_query_scans_the_history(pg_pool: asyncpg.Pool) -> None:
    """With a year of finished jobs, each query reads through indexes, a bounded row count."""
    await pg_pool.execute(_HISTORY, TEST_REGION, INSTANCES, DAYS)
    await pg_pool.execute(_IMAGES)
    await pg_pool.execute("ANALYZE")
    history = await pg_pool.fetchval("SELECT count(*) FROM jobs")
    assert history == INSTANCES * DAYS
    since = time.time() - 600
    queries: dict[str, tuple[Any, ...]] = {
        "policies": (metrics._POLICIES, None),
        "live_jobs": (metrics._LIVE_JOBS, None),
        "images": (metrics._IMAGES, None),
        "last_good": (metrics._LAST_GOOD, None),
        "targets": (metrics._TARGETS, None),
        "copy_targets": (metrics._COPY_TARGETS, None),
        "paused": (metrics._PAUSED, None),
        "finished": (metrics._FINISHED, None, since),
        "regions": (metrics._REGIONS, None),
    }
    async with pg_pool.acquire() as conn:
        for name, (query, *args) in queries.items():
            (plan,) = await _plan(conn, query, *args)
            nodes = _nodes(plan["Plan"])
            scans = [n for n in nodes if n["Node Type"] == "Seq Scan"]
            assert not [n for n in scans if n["Relation Name"] in BIG_TABLES], (name, scans)
            read = sum(n.get("Actual Rows", 0) * n.get("Actual Loops", 1) for n in nodes)
            # Live jobs, live images and the newest run are a few times INSTANCES rows.
            assert read < 40 * INSTANCES, (name, read)
