-- Handover of a rebuilt read model, made safe against a rebuild that dies mid-way: the
-- `switching` flag has an owner and a lease the rebuild keeps renewing. Workers lower an
-- expired flag, and the rebuild moves the pointers only while its lease still holds (the
-- same row, so the two can never both win). `epoch` counts switches: a worker that wrote a
-- window under an older epoch writes it again to the new version before committing.
ALTER TABLE projection_versions ADD COLUMN IF NOT EXISTS epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE projection_versions ADD COLUMN IF NOT EXISTS switch_owner TEXT;
ALTER TABLE projection_versions ADD COLUMN IF NOT EXISTS switch_lease_until TIMESTAMPTZ;

-- Streams a projector holds back after a refused (or unreadable) event, shared by every
-- worker of a deployment and recorded before the offsets that cover the refusal are
-- committed. `projection` / `version` '*' mean every projector / every version (a message
-- nobody can read). Held events start at `from_sequence`, or after the Kafka offset
-- (`from_partition`, `from_offset`) when even the sequence was unreadable.
CREATE TABLE IF NOT EXISTS parked_streams (
  scope           TEXT        NOT NULL,
  projection      TEXT        NOT NULL,
  version         TEXT        NOT NULL,
  stream          TEXT        NOT NULL,
  from_sequence   BIGINT,
  from_partition  INT,
  from_offset     BIGINT,
  reason          TEXT        NOT NULL,
  parked_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (scope, projection, version, stream),
  CHECK (from_sequence IS NOT NULL OR from_offset IS NOT NULL)
);
