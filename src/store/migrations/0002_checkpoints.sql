-- Replay checkpoints and the version of each read model readers are pointed at (DESIGN §3.5).
-- One row per (projection, version) being built or served.
CREATE TABLE IF NOT EXISTS projection_checkpoints (
  projection      TEXT        NOT NULL,
  version         TEXT        NOT NULL,
  position        BIGINT      NOT NULL DEFAULT 0,   -- every event at or below is applied
  events_applied  BIGINT      NOT NULL DEFAULT 0,
  status          TEXT        NOT NULL,             -- building | caught_up | live | retired
  started_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
  updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (projection, version)
);

-- Which version of each read model readers use; switched atomically at handover.
CREATE TABLE IF NOT EXISTS projection_versions (
  projection        TEXT PRIMARY KEY,
  live_version      TEXT        NOT NULL,
  previous_version  TEXT,
  switched_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
