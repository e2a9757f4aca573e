-- 0006_policy_bounds: every number and string in a policy has an upper bound.
--
-- Forward-only; depends on 0001 and 0004. The numbers are orchestrator/policies.py's MAX_*
-- constants. Without them a row could hold a completion window or a max age that overflows date
-- arithmetic (in Python and in Postgres' timestamptz) and stops the engine for every policy.
--
-- NOT VALID: the rules hold for every row written from now on, but a row that already breaks one
-- does not make this migration (and so the daemon's start) fail. The loader validates each row
-- with the application's rules anyway, logs `policy.invalid` and skips it; re-applying the policy
-- file (or fixing the row) makes it run again.

-- True when every tag key has 1..127 characters and every value 1..255, none of them with a
-- control character (Tencent's tag rules; raw control characters would also reach terminals).
CREATE FUNCTION cvm_backup_tags_within(m jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT AS $$
    -- CASE, not OR: only CASE promises jsonb_each_text never sees a non-object (0001's
    -- policies_instance_tags_map reports those).
    SELECT CASE WHEN jsonb_typeof(m) <> 'object' THEN true ELSE NOT EXISTS (
        SELECT 1 FROM jsonb_each_text(m) AS e(k, v)
        WHERE length(e.k) > 127 OR length(e.v) > 255
           OR e.k ~ '[[:cntrl:]]' OR e.v ~ '[[:cntrl:]]'
    ) END
$$;

ALTER TABLE policies
    ADD CONSTRAINT policies_completion_window_max
        CHECK (completion_window <= interval '31 days') NOT VALID,
    ADD CONSTRAINT policies_keep_max
        CHECK (GREATEST(keep_last, keep_daily, keep_weekly, keep_monthly, keep_yearly) <= 10000)
        NOT VALID,
    ADD CONSTRAINT policies_max_age_days_max
        CHECK (max_age_days IS NULL OR max_age_days <= 36500) NOT VALID,
    ADD CONSTRAINT policies_instance_ids_max
        CHECK (cardinality(instance_ids) <= 10000) NOT VALID,
    ADD CONSTRAINT policies_schedule_length
        CHECK (length(schedule) <= 200) NOT VALID,
    ADD CONSTRAINT policies_instance_tags_within
        CHECK (cvm_backup_tags_within(instance_tags)) NOT VALID;
