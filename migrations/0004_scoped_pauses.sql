-- 0004_scoped_pauses: pauses scoped to one region (CAM denials), and at most 9 instance tags.
--
-- Forward-only; depends on 0001 and 0003 only.
--
-- 1. CAM permissions can be limited per region, resource and tag (reference §9): a denial in one
-- region says nothing about the others. Such a denial (UnauthorizedOperation*,
-- AuthFailure.UnauthorizedOperation) now pauses only its (account, region); balance and
-- credential errors keep pausing the whole account, as before (orchestrator/pauses.py).
-- `scope_region` NULL: the whole account (every row 0003 made); a region: only that region's
-- jobs wait, and the probe goes there. One row per (account, scope): `scope_key` folds the
-- NULL into '' so it can be part of the key.
ALTER TABLE account_pauses
    ADD COLUMN scope_region text
        CONSTRAINT account_pauses_scope_region_format
        CHECK (scope_region IS NULL OR scope_region ~ '^[a-z]{2,}(-[a-z0-9]+)+$'),
    ADD COLUMN scope_key text GENERATED ALWAYS AS (coalesce(scope_region, '')) STORED,
    -- What was refused, so the pause names the action and the policy to fix in CAM; NULL in
    -- rows made before this migration.
    ADD COLUMN action text,
    ADD COLUMN policy text,
    -- A regional pause is probed in its own region.
    ADD CONSTRAINT account_pauses_probe_in_scope
        CHECK (scope_region IS NULL OR scope_region = region);

ALTER TABLE account_pauses
    DROP CONSTRAINT account_pauses_pkey,
    ADD CONSTRAINT account_pauses_pkey PRIMARY KEY (account, scope_key);

-- 2. DescribeInstances takes at most 10 filters (reference §3.5); each instance tag is one
-- `tag:KEY` filter, and one filter stays free for the query itself. The policy file refuses
-- more than 9 (orchestrator/policies.py); this refuses them in plain SQL too. A CHECK may not
-- hold a subquery, hence a function; IMMUTABLE because it only looks at its argument.
CREATE FUNCTION cvm_backup_key_count(m jsonb) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE WHEN jsonb_typeof(m) = 'object'
                THEN (SELECT count(*)::integer FROM jsonb_object_keys(m))
                ELSE 0 END
$$;

-- NOT VALID: a policy stored before this migration with more tags never resolved its targets
-- (the API refused the query) and keeps saying so in `schedule.failed`; it must not block the
-- upgrade. Every insert and update from now on is checked.
ALTER TABLE policies
    ADD CONSTRAINT policies_instance_tags_limit
    CHECK (cvm_backup_key_count(instance_tags) <= 9) NOT VALID;
