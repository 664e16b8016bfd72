-- Streams an operator unparked (`projector dlq unpark`), remembered for a while. A worker
-- reads the parks again only every few seconds: until then it holds what arrives of a
-- stream, after the unpark's replay has read the store. The first live event of the stream
-- a stage then takes must not pass over those held events (the guard, a high-water mark,
-- would take them for duplicates): a stage that sees a release splices the stream's stored
-- history before that event, once, and its guard skips what is applied already. Kept here,
-- not only in memory, so a worker that restarts in between does the same.
CREATE TABLE IF NOT EXISTS released_streams (
  scope        TEXT        NOT NULL,
  stream       TEXT        NOT NULL,
  released_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (scope, stream)
);
