-- 0005_delete_confirmation: a deletion is done when the image is gone, not when DeleteImages answers.
--
-- Forward-only; depends on 0001 only.
--
-- On the real API a deleted image stays listed as DELETING for a while, still holding its unit
-- of quota and its name (reference §9). Deletion is now three steps: the intent
-- (delete_requested_at, before the call), the call (delete_sent_at, once DeleteImages answered),
-- and the confirmation (deleted_at, once DescribeImages no longer lists the image). Until then
-- the image counts as occupying quota and is never sent to DeleteImages again
-- (orchestrator/rotation.py). Rows made before this migration have no delete_sent_at: their
-- open intents are re-issued as before, and NotFound or IncorrectState answers close them.
ALTER TABLE images
    ADD COLUMN delete_sent_at timestamptz,
    -- Who sent it ('retention', 'rotation'): the confirmation's event is named after it.
    ADD COLUMN delete_kind text
        CONSTRAINT images_delete_kind_format CHECK (delete_kind ~ '^[a-z_]{1,32}$'),
    ADD CONSTRAINT images_delete_sent_after_intent
        CHECK (delete_sent_at IS NULL OR delete_requested_at IS NOT NULL),
    ADD CONSTRAINT images_delete_sent_by
        CHECK ((delete_sent_at IS NULL) = (delete_kind IS NULL));

-- The confirmation pass looks only at deletions sent and not yet confirmed, per region.
CREATE INDEX images_delete_sent_idx ON images (account, region)
    WHERE delete_sent_at IS NOT NULL AND deleted_at IS NULL;
