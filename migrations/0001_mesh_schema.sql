-- meshbroker migration 0001: the `mesh` schema shared with the claudemesh
-- web app (PROTOCOL.md §8).
--
-- Same schema, enum, table and column names and types as an existing
-- claudemesh database (../shared/fixtures/claudemesh-existing-schema.sql),
-- so this runs as a no-op on top of one and creates everything on an empty
-- database. Differences on a fresh database: user ids (`owner_user_id`,
-- `user_id`, `created_by`) are plain text, because the broker must not
-- depend on any table outside schema `mesh`. Foreign keys inside `mesh`
-- are kept as the web app declares them.
--
-- Timestamps are `timestamp without time zone` holding UTC; the broker sets
-- `TimeZone = 'UTC'` on its sessions so `now()` defaults are UTC too.
--
-- Every statement is idempotent: this file may run against a database that
-- already has some or all of these objects.

CREATE SCHEMA IF NOT EXISTS mesh;

-- Enum types. CREATE TYPE has no IF NOT EXISTS; swallow duplicate_object.
DO $$ BEGIN
  CREATE TYPE mesh.role AS ENUM ('admin', 'member');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

DO $$ BEGIN
  CREATE TYPE mesh.tier AS ENUM ('free', 'pro', 'team', 'enterprise');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

DO $$ BEGIN
  CREATE TYPE mesh.transport AS ENUM ('managed', 'tailscale', 'self_hosted');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

DO $$ BEGIN
  CREATE TYPE mesh.visibility AS ENUM ('private', 'public');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

DO $$ BEGIN
  CREATE TYPE mesh.message_priority AS ENUM ('now', 'next', 'low');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

DO $$ BEGIN
  CREATE TYPE mesh.presence_status AS ENUM ('idle', 'working', 'dnd');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

DO $$ BEGIN
  CREATE TYPE mesh.presence_status_source AS ENUM ('hook', 'manual', 'jsonl');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

CREATE TABLE IF NOT EXISTS mesh.mesh (
  id text PRIMARY KEY,
  name text NOT NULL,
  slug text NOT NULL UNIQUE,
  owner_user_id text NOT NULL,
  visibility mesh.visibility NOT NULL DEFAULT 'private',
  transport mesh.transport NOT NULL DEFAULT 'managed',
  max_peers integer,
  tier mesh.tier NOT NULL DEFAULT 'free',
  created_at timestamp NOT NULL DEFAULT now(),
  archived_at timestamp
);

CREATE TABLE IF NOT EXISTS mesh.member (
  id text PRIMARY KEY,
  mesh_id text NOT NULL REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
  user_id text,
  peer_pubkey text NOT NULL,
  display_name text NOT NULL,
  role mesh.role NOT NULL DEFAULT 'member',
  joined_at timestamp NOT NULL DEFAULT now(),
  last_seen_at timestamp,
  revoked_at timestamp
);

CREATE TABLE IF NOT EXISTS mesh.invite (
  id text PRIMARY KEY,
  mesh_id text NOT NULL REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
  token text NOT NULL UNIQUE,
  max_uses integer NOT NULL DEFAULT 1,
  used_count integer NOT NULL DEFAULT 0,
  role mesh.role NOT NULL DEFAULT 'member',
  expires_at timestamp NOT NULL,
  created_by text NOT NULL,
  created_at timestamp NOT NULL DEFAULT now(),
  revoked_at timestamp
);

CREATE TABLE IF NOT EXISTS mesh.audit_log (
  id text PRIMARY KEY,
  mesh_id text NOT NULL REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
  event_type text NOT NULL,
  actor_peer_id text,
  target_peer_id text,
  metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
  created_at timestamp NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS mesh.presence (
  id text PRIMARY KEY,
  member_id text NOT NULL REFERENCES mesh.member(id) ON DELETE CASCADE ON UPDATE CASCADE,
  session_id text NOT NULL,
  pid integer NOT NULL,
  cwd text NOT NULL,
  status mesh.presence_status NOT NULL DEFAULT 'idle',
  status_source mesh.presence_status_source NOT NULL DEFAULT 'jsonl',
  status_updated_at timestamp NOT NULL DEFAULT now(),
  connected_at timestamp NOT NULL DEFAULT now(),
  last_ping_at timestamp NOT NULL DEFAULT now(),
  disconnected_at timestamp
);

CREATE TABLE IF NOT EXISTS mesh.message_queue (
  id text PRIMARY KEY,
  mesh_id text NOT NULL REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
  sender_member_id text NOT NULL REFERENCES mesh.member(id) ON DELETE CASCADE ON UPDATE CASCADE,
  target_spec text NOT NULL,
  priority mesh.message_priority NOT NULL DEFAULT 'next',
  nonce text NOT NULL,
  ciphertext text NOT NULL,
  created_at timestamp NOT NULL DEFAULT now(),
  delivered_at timestamp,
  expires_at timestamp
);

CREATE TABLE IF NOT EXISTS mesh.pending_status (
  id text PRIMARY KEY,
  pid integer NOT NULL,
  cwd text NOT NULL,
  status text NOT NULL,
  status_source text NOT NULL,
  created_at timestamp NOT NULL DEFAULT now(),
  applied_at timestamp
);

-- Columns the broker relies on that an older claudemesh deployment may
-- predate (the fixture has them all; these are no-ops there). Only nullable
-- or defaulted columns, so they can be added to tables that hold rows.
ALTER TABLE mesh.member ADD COLUMN IF NOT EXISTS last_seen_at timestamp;
ALTER TABLE mesh.member ADD COLUMN IF NOT EXISTS revoked_at timestamp;
ALTER TABLE mesh.presence
  ADD COLUMN IF NOT EXISTS status_source mesh.presence_status_source NOT NULL DEFAULT 'jsonl';
ALTER TABLE mesh.presence
  ADD COLUMN IF NOT EXISTS status_updated_at timestamp NOT NULL DEFAULT now();
ALTER TABLE mesh.presence ADD COLUMN IF NOT EXISTS last_ping_at timestamp NOT NULL DEFAULT now();
ALTER TABLE mesh.presence ADD COLUMN IF NOT EXISTS disconnected_at timestamp;
ALTER TABLE mesh.message_queue ADD COLUMN IF NOT EXISTS delivered_at timestamp;
ALTER TABLE mesh.message_queue ADD COLUMN IF NOT EXISTS expires_at timestamp;
ALTER TABLE mesh.pending_status ADD COLUMN IF NOT EXISTS applied_at timestamp;
