-- 0003_account_pauses: one row per account whose API calls are stopped by an account-wide error.
--
-- Forward-only. An account-wide answer (AuthFailure.*, UnauthorizedOperation*,
-- InvalidAccount.InsufficientBalance: DESIGN §3) fails the job that got it and pauses the whole
-- account (orchestrator/pauses.py). In Postgres rather than in memory so a restart does not
-- hammer the broken account again and every replica sees the pause; the claim statement skips
-- jobs of a paused account by itself (a NOT EXISTS on this table).
-- No row: the account is driven normally. A row: no job of the account is claimed; the replica
-- holding the account's lease probes it when `probe_at` comes (orchestrator/prober.py) and
-- deletes the row when the probe succeeds; `cvm-backup account resume NAME` deletes it at once.
CREATE TABLE account_pauses (
    account        text NOT NULL
                   CONSTRAINT account_pauses_account_format CHECK (account ~ '^[A-Za-z0-9_.-]{1,64}$'),
    paused_at      timestamptz NOT NULL DEFAULT now(),
    -- What tripped (or last re-confirmed) the pause: Tencent's code, message and request id.
    -- Never a secret: Tencent's answers do not carry one.
    code           text NOT NULL CONSTRAINT account_pauses_code_nonempty CHECK (code <> ''),
    message        text NOT NULL DEFAULT '',
    request_id     text,
    -- Where the probe calls (a CreateImage DryRun): the region and instance of the failed job.
    region         text NOT NULL CONSTRAINT account_pauses_region_nonempty CHECK (region <> ''),
    instance_id    text NOT NULL CONSTRAINT account_pauses_instance_format CHECK (instance_id ~ '^ins-[a-z0-9]{1,32}$'),
    -- When the next probe may go; an account-wide answer to a probe pushes it out with a
    -- bounded backoff that doubles with `failed_probes`.
    probe_at       timestamptz NOT NULL,
    failed_probes  integer NOT NULL DEFAULT 0 CONSTRAINT account_pauses_failed_probes_nonneg CHECK (failed_probes >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT account_pauses_pkey PRIMARY KEY (account),
    CONSTRAINT account_pauses_probe_after_pause CHECK (probe_at >= paused_at)
);
