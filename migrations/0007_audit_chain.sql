-- meshbroker migration 0007: the audit chain (PROTOCOL.md §13).
--
-- Each mesh's `mesh.audit_log` rows form one hash chain: a row's `hash` is
-- the SHA-256 of its `prev_hash` (the hash of the mesh's row before it in
-- chain order, `created_at` then `id`, or `genesis` for the first) and of
-- its own columns; see src/db/chain.rs for the exact formula.
--
-- Nullable with no default: rows written before the chain existed (by the
-- old broker, an earlier run, the web app) have neither, and are skipped
-- (and counted) by `meshbroker audit verify`; adding them to a table that
-- holds rows rewrites nothing. ADD COLUMN IF NOT EXISTS keeps columns of
-- those names a newer claudemesh may already have made.
--
-- No index of its own: the writer's "last chained row of a mesh" and the
-- verifier's walk both read a mesh's rows in `created_at` order through
-- audit_log_mesh_id_created_at_idx (0002).
ALTER TABLE mesh.audit_log ADD COLUMN IF NOT EXISTS prev_hash text;
ALTER TABLE mesh.audit_log ADD COLUMN IF NOT EXISTS hash text;
