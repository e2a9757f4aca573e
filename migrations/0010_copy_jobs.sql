-- 0010_copy_jobs: a copy of a backup in another region is a job like the backup itself.
--
-- Forward-only; depends on 0001 and 0009. A copy job (kind 'copy') is made when its backup job
-- succeeds, one per destination in the policy's `copies`, in the same transaction: the run stays
-- open until its copies end too. It has the backup's policy, instance and slot, the destination
-- as its region, and the backup's image name: names are unique per region, and in the
-- destination no backup of this policy carries it. Claim, lease, fence, backoff, window and
-- terminal states are the backup jobs'; the call is SyncImages instead of CreateImage, and the
-- tracker follows the copy in the destination (SYNCING, then NORMAL).
ALTER TABLE jobs
    ADD COLUMN kind text NOT NULL DEFAULT 'backup'
        CONSTRAINT jobs_kind CHECK (kind IN ('backup', 'copy')),
    -- The backup image the copy is made from, and its region (SyncImages is sent there).
    ADD COLUMN source_image_id text,
    ADD COLUMN source_region text,
    ADD CONSTRAINT jobs_copy_has_source CHECK (
        (kind = 'copy') = (source_image_id IS NOT NULL AND source_region IS NOT NULL)
    ),
    ADD CONSTRAINT jobs_copy_elsewhere CHECK (kind = 'backup' OR source_region <> region);

-- One job per (policy, instance, slot) and region: the backup in the policy's region and at most
-- one copy in each destination. Same leading columns as before, so "the latest job of each
-- (policy, instance)" is still a backward scan of this index.
ALTER TABLE jobs DROP CONSTRAINT jobs_policy_instance_slot_key;
ALTER TABLE jobs ADD CONSTRAINT jobs_policy_instance_slot_region_key
    UNIQUE (policy_id, instance_id, slot, region);

-- Retention and rotation ask, per image, whether a sync from it still runs: such a source is
-- never deleted (DeleteImages refuses it anyway, and the copy would be lost).
CREATE INDEX jobs_copy_running_idx ON jobs (source_image_id)
    WHERE kind = 'copy' AND finished_at IS NULL;

-- A copy's image row names its source; NULL for backups. Retention keeps a copy by its
-- destination's rules (policies.copies), a backup by the policy's own.
ALTER TABLE images ADD COLUMN source_image_id text;

-- One keep rule of a copy destination: policies.copies holds {region, keep_last, ...} objects.
-- NULL when the region is not (or no longer) a destination, or the rule is not set.
CREATE FUNCTION cvm_backup_copy_rule(copies jsonb, destination text, rule text)
RETURNS integer LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT (c ->> rule)::integer FROM jsonb_array_elements(copies) AS c
    WHERE c ->> 'region' = destination
    LIMIT 1
$$;

-- Reconciliation finds the backup a listed untagged image is a copy of by its exact name.
CREATE INDEX images_backup_name_idx ON images (account, name) WHERE source_image_id IS NULL;
