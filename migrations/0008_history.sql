-- 0008_history: history that does not grow forever (orchestrator/history.py).
--
-- Forward-only; depends on 0001 only.
--
-- The daemon prunes finished jobs, their ledger rows, deleted images' rows and empty runs older
-- than `history_days` (orchestrator/history.py). Rows of images that still exist, and the jobs
-- they reference, are never pruned: retention reads only those.

-- 1. The ledger stays append-only for everyone but the pruner. A DELETE passes only inside a
-- transaction that set `cvm_backup.prune_history` to 'on' (set_config(..., true): for that
-- transaction alone), and only for a row older than 32 days, the least `history_days` allows,
-- so no setting, bug or hand-typed statement can remove what a recent decision wrote. UPDATE
-- and TRUNCATE are refused as before (events_append_only, events_no_truncate: 0001).
CREATE OR REPLACE FUNCTION cvm_backup_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND current_setting('cvm_backup.prune_history', true) = 'on'
       AND OLD.at < now() - interval '32 days' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'events is append-only: % refused', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;

-- 2. Deleted images' rows, oldest deletion first: what the pruner looks for. Partial, so it
-- holds only rows already deleted and costs live images nothing.
CREATE INDEX images_deleted_idx ON images (deleted_at) WHERE deleted_at IS NOT NULL;
