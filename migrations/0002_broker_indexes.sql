-- meshbroker migration 0002: the indexes the broker's queries need. An
-- existing claudemesh database has none on the mesh tables.
--
-- Plain CREATE INDEX (not CONCURRENTLY) because migrations run inside one
-- transaction under an advisory lock; the mesh tables are small enough
-- that the brief lock taken while building is acceptable at start-up.

-- hello: look up a member by (id, mesh_id, peer_pubkey); `*` fan-out and
-- targetSpec resolution list a mesh's members.
CREATE INDEX IF NOT EXISTS member_mesh_id_idx
  ON mesh.member (mesh_id);
CREATE INDEX IF NOT EXISTS member_mesh_id_peer_pubkey_idx
  ON mesh.member (mesh_id, peer_pubkey);

-- Live sessions: closing rows left open by an unclean stop, and finding a
-- member's open sessions.
CREATE INDEX IF NOT EXISTS presence_open_member_id_idx
  ON mesh.presence (member_id)
  WHERE disconnected_at IS NULL;

-- Held envelopes: per recipient in creation order, and the expiry sweep.
CREATE INDEX IF NOT EXISTS message_queue_undelivered_idx
  ON mesh.message_queue (mesh_id, target_spec, created_at)
  WHERE delivered_at IS NULL;
CREATE INDEX IF NOT EXISTS message_queue_undelivered_expires_at_idx
  ON mesh.message_queue (expires_at)
  WHERE delivered_at IS NULL;

-- Stashed hook signals: newest unapplied one for a (pid, cwd).
CREATE INDEX IF NOT EXISTS pending_status_unapplied_idx
  ON mesh.pending_status (pid, cwd, created_at)
  WHERE applied_at IS NULL;

-- Audit trail per mesh in time order.
CREATE INDEX IF NOT EXISTS audit_log_mesh_id_created_at_idx
  ON mesh.audit_log (mesh_id, created_at);
