-- Handover of a rebuilt read model: while `switching`, live workers hold their next batch so
-- the rebuild can take its last step alone, then the pointer moves atomically.
ALTER TABLE projection_versions ADD COLUMN IF NOT EXISTS switching BOOLEAN NOT NULL DEFAULT false;
