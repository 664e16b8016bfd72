-- Per consumer group and stream, the last sequence that is durable: every stage of the
-- group acknowledged the window that carried it (and every earlier one). The live sequencer
-- starts a stream it sees for the first time (after a restart, a reassignment, a new
-- consumer, or once forgotten) from here, so an event lost on the wire right there is filled
-- from the event store instead of applied over. It may lag what is durable (a lagging row
-- only refills events the guards skip), never lead it; upserts keep the greatest.
CREATE TABLE IF NOT EXISTS stream_positions (
  group_id        TEXT   NOT NULL,
  aggregate_type  TEXT   NOT NULL,
  aggregate_id    TEXT   NOT NULL,
  sequence        BIGINT NOT NULL,
  PRIMARY KEY (group_id, aggregate_type, aggregate_id)
);
