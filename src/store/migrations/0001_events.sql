-- The event store of DESIGN §1: the source of truth for replay.
CREATE TABLE IF NOT EXISTS events (
  global_position BIGSERIAL PRIMARY KEY,          -- total order of commits (may have gaps!)
  event_id        UUID        NOT NULL UNIQUE,
  aggregate_type  TEXT        NOT NULL,
  aggregate_id    TEXT        NOT NULL,
  sequence_number BIGINT      NOT NULL CHECK (sequence_number >= 0),
  event_type      TEXT        NOT NULL,
  event_data      JSONB       NOT NULL,
  metadata        JSONB       NOT NULL DEFAULT '{}',
  timestamp       TIMESTAMPTZ NOT NULL,
  checksum        TEXT,
  CONSTRAINT events_stream_sequence UNIQUE (aggregate_type, aggregate_id, sequence_number)
);
