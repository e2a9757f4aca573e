-- 0002_quota_gates: one row per (account, region) whose custom-image quota is known to be full.
--
-- Forward-only. Without it every waiting job of a full region kept calling CreateImage on its
-- own backoff, each call answering ImageQuotaLimitExceeded (orchestrator/quota_gate.py).
-- No row: the region is open and jobs call CreateImage freely. A row: the region was seen full
-- and rotation could not free room yet; jobs of that region do not call CreateImage unless
-- they hold a token (room someone measured or freed) or are the one probe measuring the room.
-- In Postgres rather than in memory so every replica sees the same gate.
CREATE TABLE quota_gates (
    account     text NOT NULL,
    region      text NOT NULL,
    closed_at   timestamptz NOT NULL DEFAULT now(),
    -- Consecutive closures without room found: the bounded backoff doubles with them.
    closures    integer NOT NULL DEFAULT 1 CONSTRAINT quota_gates_closures_positive CHECK (closures > 0),
    -- When a probe may go even without a signal; a signal (one of our images settled or was
    -- deleted in the region) pulls it to now().
    reopen_at   timestamptz NOT NULL,
    -- Jobs that may call CreateImage without probing: room measured or freed by rotation.
    tokens      integer NOT NULL DEFAULT 0 CONSTRAINT quota_gates_tokens_nonneg CHECK (tokens >= 0),
    -- The job measuring the room right now, and until when its claim holds (a crashed probe
    -- lapses like a lease).
    probe_job   bigint,
    probe_until timestamptz,
    CONSTRAINT quota_gates_pkey PRIMARY KEY (account, region),
    CONSTRAINT quota_gates_probe_pair CHECK ((probe_job IS NULL) = (probe_until IS NULL))
);
