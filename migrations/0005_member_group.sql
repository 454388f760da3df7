-- meshbroker migration 0005: group membership (PROTOCOL.md §10).
--
-- Membership belongs to the member (the unit of delivery) and survives
-- reconnects and restarts. `role` is free text (≤ 32 chars, checked by the
-- broker). `joined_at` is the first join; a later join of the same group
-- only changes `role`.
--
-- CREATE TABLE IF NOT EXISTS: a claudemesh database whose web app already
-- created this table keeps it and its rows as they are. The primary key
-- (member_id, name) also serves the broker's per-member reads, so no other
-- index is needed.
CREATE TABLE IF NOT EXISTS mesh.member_group (
  member_id text NOT NULL REFERENCES mesh.member(id) ON DELETE CASCADE ON UPDATE CASCADE,
  name text NOT NULL,
  role text,
  joined_at timestamp NOT NULL DEFAULT now(),
  PRIMARY KEY (member_id, name)
);
