-- meshbroker migration 0008: enrollment with a signed invite (PROTOCOL.md §12).
--
-- `POST /join` checks an invite against its mesh: the payload's
-- `owner_pubkey` must be the mesh's, and its `mesh_root_key` the mesh's
-- where the mesh has one. An existing claudemesh database may predate both
-- columns, so they are added nullable, with no default: adding them to a
-- table that holds rows rewrites nothing, and a mesh without an owner key
-- refuses every join (`mesh_missing_owner_key`) until one is set.
-- ADD COLUMN IF NOT EXISTS keeps columns of those names the web app may
-- already have made.
--
-- `mesh.invite` itself (token, max_uses, used_count, role, expires_at,
-- revoked_at) is created by 0001 where it is missing, exactly as the web
-- app declares it; the broker adds nothing to it. Its `token` is UNIQUE,
-- which is the index the join's lookup and its atomic
-- `UPDATE … WHERE token = $1 AND used_count < max_uses` use.
ALTER TABLE mesh.mesh ADD COLUMN IF NOT EXISTS owner_pubkey text;
ALTER TABLE mesh.mesh ADD COLUMN IF NOT EXISTS root_key text;
