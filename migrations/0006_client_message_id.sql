-- meshbroker migration 0006: a send's client_message_id (PROTOCOL.md §11).
--
-- A held envelope keeps the sender's own id for it, so its pushes carry
-- the id after a restart, and a send that repeats a (sender member,
-- client_message_id) accepted within DEDUPE_WINDOW_SECONDS is still found
-- to be a duplicate when the first one was held across the restart.
--
-- Nullable with no default: rows the old broker (or an earlier run) wrote,
-- and sends without an id, have none; adding it to a table that holds rows
-- rewrites nothing. ADD COLUMN IF NOT EXISTS keeps a column of that name
-- the web app may already have made.
ALTER TABLE mesh.message_queue ADD COLUMN IF NOT EXISTS client_message_id text;

-- The duplicate lookup: a sender's rows by their client_message_id.
-- Not unique: the window is the broker's rule, not the table's (the same
-- id may be sent again once the window has passed). Partial, so sends
-- without an id (every send of a client that does not use them) pay
-- nothing for it.
CREATE INDEX IF NOT EXISTS message_queue_sender_client_message_id_idx
  ON mesh.message_queue (sender_member_id, client_message_id)
  WHERE client_message_id IS NOT NULL;
