-- meshbroker migration 0003: per-member delivery state of held broadcasts.
--
-- A `*` envelope held for several members is one mesh.message_queue row
-- (one messageId) plus one row here per member it was held for;
-- `delivered_at` on the message_queue row then means "every member it was
-- held for has it". Direct rows need none: their own `delivered_at` says it.
-- Rows the old claudemesh broker wrote have none either; the broker adds
-- them (one per member but the sender) when it first loads such a row.
CREATE TABLE IF NOT EXISTS mesh.message_delivery (
  message_id text NOT NULL REFERENCES mesh.message_queue(id) ON DELETE CASCADE ON UPDATE CASCADE,
  member_id text NOT NULL,
  delivered_at timestamp,
  PRIMARY KEY (message_id, member_id)
);
