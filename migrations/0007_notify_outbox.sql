-- 0007_notify_outbox: webhook notifications ([[notify]] in the daemon config) from a durable outbox.
--
-- Forward-only; depends on 0001 (jobs, events) and 0003 (the account.paused/resumed ledger rows).
--
-- Two stages, so that nothing on a job's path waits for a webhook:
--   notify_events  what happened, written by triggers in the same transaction as the change
--                  itself (a job turning failed or expired; a quota.exhausted, account.paused or
--                  account.resumed ledger row), so a crash can neither lose an event nor report
--                  one that was rolled back. The daemon's notifier consumes these rows.
--   notify_outbox  one message per (webhook target, group): a run's failures, or the other
--                  events of a short while. It stays `open` while it gathers and becomes
--                  `pending` once sealed; delivered (or given-up) rows are deleted.
--
-- Job outcomes come from the jobs table rather than the ledger: it is the authority on a job's
-- terminal state, every path that ends a job writes it, and it carries the run, reason, code and
-- message in the same columns whichever path wrote them (the ledger records a dispatcher's
-- failure as `job.attempt` and a tracker's as `job.failed`, with the run only on some).
--
-- No webhook URL is ever stored: a target is its configured name, or its format and a short hash.

CREATE TABLE notify_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    kind        text NOT NULL CONSTRAINT notify_events_kind_format
                CHECK (kind ~ '^[a-z_]+(\.[a-z_]+)+$'),
    run_id      bigint,
    policy_id   bigint,
    job_id      bigint,
    account     text,
    region      text,
    instance_id text,
    reason      text,
    code        text,
    message     text CONSTRAINT notify_events_message_length CHECK (length(message) <= 500),
    details     jsonb NOT NULL DEFAULT '{}'
                CONSTRAINT notify_events_details_object CHECK (jsonb_typeof(details) = 'object')
);

CREATE FUNCTION cvm_backup_notify_job() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO notify_events (kind, run_id, policy_id, job_id, account, region, instance_id,
                               reason, code, message)
    VALUES ('job.' || NEW.state, NEW.run_id, NEW.policy_id, NEW.id, NEW.account, NEW.region,
            NEW.instance_id, NEW.reason, NEW.last_error_code, left(NEW.last_error_message, 500));
    RETURN NULL;
END
$$;

-- Jobs are only ever inserted pending or skipped (orchestrator/scheduler.py), so an UPDATE
-- trigger sees every failure and expiry, once: the WHEN clause skips rewrites of the same state.
CREATE TRIGGER jobs_notify AFTER UPDATE OF state ON jobs
    FOR EACH ROW
    WHEN (NEW.state IN ('failed', 'expired') AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION cvm_backup_notify_job();

CREATE FUNCTION cvm_backup_notify_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO notify_events (kind, account, region, instance_id, reason, details)
    VALUES (NEW.kind, NEW.account, NEW.region, NEW.instance_id, NEW.reason, NEW.details);
    RETURN NULL;
END
$$;

-- Each of these is written once per occurrence, in the transaction that pauses, resumes or
-- gives up (orchestrator/pauses.py, orchestrator/rotation.py, `cvm-backup account resume`).
CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH ROW
    WHEN (NEW.kind IN ('quota.exhausted', 'account.paused', 'account.resumed'))
    EXECUTE FUNCTION cvm_backup_notify_event();

CREATE TABLE notify_outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The configured name of the target, or "<format>-<hash>": never the URL (it holds a token).
    target          text NOT NULL CONSTRAINT notify_outbox_target_length
                    CHECK (length(target) BETWEEN 1 AND 64),
    -- 'run:<id>' for a run's job outcomes, 'events' for the rest.
    group_key       text NOT NULL CONSTRAINT notify_outbox_group_length
                    CHECK (length(group_key) BETWEEN 1 AND 64),
    run_id          bigint,
    state           text NOT NULL DEFAULT 'open'
                    CONSTRAINT notify_outbox_state CHECK (state IN ('open', 'pending')),
    -- What the group is about: the run's policy and slot.
    subject         jsonb NOT NULL DEFAULT '{}'
                    CONSTRAINT notify_outbox_subject_object CHECK (jsonb_typeof(subject) = 'object'),
    -- The first events of the group (at most 50, orchestrator/notify/outbox.py); `total` and
    -- `counts` (per kind) count all of them, listed or not.
    items           jsonb NOT NULL DEFAULT '[]'
                    CONSTRAINT notify_outbox_items_array CHECK (jsonb_typeof(items) = 'array'),
    total           integer NOT NULL DEFAULT 0 CONSTRAINT notify_outbox_total_nonneg CHECK (total >= 0),
    counts          jsonb NOT NULL DEFAULT '{}'
                    CONSTRAINT notify_outbox_counts_object CHECK (jsonb_typeof(counts) = 'object'),
    -- Copied from the target's settings when the group opens, so sealing and giving up need no
    -- configuration (any replica can do either, even for a target it does not know).
    group_delay     double precision NOT NULL
                    CONSTRAINT notify_outbox_group_delay CHECK (group_delay BETWEEN 0 AND 3600),
    give_up_after   double precision NOT NULL
                    CONSTRAINT notify_outbox_give_up_after CHECK (give_up_after > 0 AND give_up_after <= 604800),
    opened_at       timestamptz NOT NULL DEFAULT now(),
    last_at         timestamptz NOT NULL DEFAULT now(),
    sealed_at       timestamptz,
    attempts        integer NOT NULL DEFAULT 0 CONSTRAINT notify_outbox_attempts_nonneg CHECK (attempts >= 0),
    -- Pending: when the next attempt is due; a claim moves it past the attempt's timeout, so the
    -- claim of a replica that died lapses by itself.
    next_attempt_at timestamptz,
    last_error      text CONSTRAINT notify_outbox_last_error_length CHECK (length(last_error) <= 500),
    CONSTRAINT notify_outbox_sealed CHECK ((state = 'pending') = (sealed_at IS NOT NULL)),
    CONSTRAINT notify_outbox_due CHECK ((state = 'pending') = (next_attempt_at IS NOT NULL))
);

-- One gathering message per (target, group): concurrent replicas append to the same row.
CREATE UNIQUE INDEX notify_outbox_open_key ON notify_outbox (target, group_key) WHERE state = 'open';
CREATE INDEX notify_outbox_due_idx ON notify_outbox (target, next_attempt_at, id) WHERE state = 'pending';
