-- 0009_policy_copies: cross-region copies of every backup, each destination with its own
-- retention (the policy file's [[policies.copies]] tables).
--
-- Forward-only; depends on 0001. An array of objects {region, keep_last, keep_daily,
-- keep_weekly, keep_monthly, keep_yearly, max_age_days}, at most 3 (MAX_COPIES in
-- orchestrator/policies.py). The shape of each element (a region unlike the policy's, no region
-- twice, keep rules in range) is checked by the application, which validates every row it loads
-- and skips a bad one with `policy.invalid`; Postgres holds what it can say simply.
ALTER TABLE policies
    ADD COLUMN copies jsonb NOT NULL DEFAULT '[]'
        CONSTRAINT policies_copies_array
        CHECK (jsonb_typeof(copies) = 'array' AND jsonb_array_length(copies) <= 3);
