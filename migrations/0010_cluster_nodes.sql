-- meshbroker migration 0010: which broker node a presence row and a held
-- envelope belong to (README "Several nodes").
--
-- With NATS_URL set, several nodes share one database. A node that starts
-- closes only its own presence rows (and those of no node: the old broker's
-- or a one-node run's), and reloads only the held envelopes it accepted; a
-- node that dies has its rows ended and its held envelopes claimed by a
-- surviving node, by `held_by`.
--
-- Nullable with no default: rows of one-node runs and of the old broker
-- have none, and adding the columns rewrites nothing.
ALTER TABLE mesh.presence ADD COLUMN IF NOT EXISTS node_id text;
ALTER TABLE mesh.message_queue ADD COLUMN IF NOT EXISTS held_by text;
CREATE INDEX IF NOT EXISTS message_queue_held_by_pending_idx
  ON mesh.message_queue (held_by) WHERE delivered_at IS NULL;
