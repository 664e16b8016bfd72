-- Gap-safe replay (DESIGN §1): global_position comes from a sequence, so a transaction that
-- commits later can hold a smaller position than rows already visible. Each row records the
-- id of the transaction that wrote it; a replay reads in (transaction_id, global_position)
-- order and only below the snapshot's xmin, where every transaction has finished: nothing can
-- appear behind its checkpoint later, and a rolled-back transaction leaves no gap to wait on.
ALTER TABLE events ADD COLUMN IF NOT EXISTS transaction_id XID8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX IF NOT EXISTS events_commit_order ON events (transaction_id, global_position);
ALTER TABLE projection_checkpoints ADD COLUMN IF NOT EXISTS transaction_id XID8 NOT NULL DEFAULT '0';
