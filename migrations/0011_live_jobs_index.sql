-- 0011_live_jobs_index: "the live jobs of a region" costs the live jobs, not the history.
--
-- Forward-only; depends on 0001. A job is live exactly while finished_at IS NULL (0001's
-- jobs_finished_at CHECK), so queries that ask for live jobs say that and match this partial
-- index: `run --once` counting what is left, reconciliation's names still being made, rotation's
-- "is room coming". With a year of history for 3,000 instances each took 100-160 ms through
-- `state = ANY(...)`, which no partial index can serve.
CREATE INDEX jobs_live_idx ON jobs (account, region) WHERE finished_at IS NULL;
