-- meshbroker migration 0004: held-envelope indexes that serve the broker's
-- queries and cost each insert as little as possible.
--
-- Every held envelope is a mesh.message_queue insert, so each index is paid
-- per send that must be held. The start-up load reads undelivered rows
-- mesh by mesh in creation order (keyset on mesh_id, created_at, id): this
-- index serves it without a sort. The two indexes of 0002 served no query
-- the broker runs (per-recipient lookups are done in memory; the start-up
-- expiry delete must read every undelivered row anyway, since rows written
-- without an expires_at expire by created_at).
CREATE INDEX IF NOT EXISTS message_queue_undelivered_mesh_created_idx
  ON mesh.message_queue (mesh_id, created_at, id)
  WHERE delivered_at IS NULL;
DROP INDEX IF EXISTS mesh.message_queue_undelivered_idx;
DROP INDEX IF EXISTS mesh.message_queue_undelivered_expires_at_idx;
