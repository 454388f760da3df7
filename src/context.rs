//! What every shard shares, read-mostly: configuration, metrics, the
//! membership directory and its lookup, the db handle and audit lane, the
//! shards' inboxes, the connection count, the hook index and the
//! transcript reader.
use crate::config::Config;
use crate::db::held::HeldLane;
use crate::db::{AuditLane, DbHandle, DbStatus};
use crate::hook::HookRateLimiter;
use crate::inbox::ShardSender;
use crate::join::JoinRateLimiter;
use crate::mesh::directory::{Directory, MeshEntry};
use crate::metrics::Metrics;
use crate::shard::slots::ConnectionSlots;
use crate::status::hook_index::HookIndex;
use crate::status::transcript::TranscriptReader;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A directory miss (member not in a loaded mesh) reloads the mesh at most
/// this often, so a stream of bad hellos cannot hammer Postgres. A miss
/// inside the window waits for it to pass rather than refusing a member
/// that may just have been added.
const MISS_RELOAD_AFTER: Duration = Duration::from_secs(1);

/// Everything the shards share, read-mostly.
pub struct BrokerContext {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub db: DbHandle,
    /// The durable lane: held envelopes and their marks (`db::held`).
    pub held: HeldLane,
    /// Where audit events go (never blocks; may drop, counted).
    pub(crate) audit: AuditLane,
    pub db_status: Arc<DbStatus>,
    pub directory: Arc<Directory>,
    pub shards: Vec<ShardSender>,
    /// Open sockets over all shards, bounded by `MAX_CONNECTIONS`.
    pub(crate) connections: Arc<ConnectionSlots>,
    pub hook_limiter: Mutex<HookRateLimiter>,
    /// `POST /join` requests per client address (`JOIN_RATE_LIMIT_PER_MIN`).
    pub join_limiter: Mutex<JoinRateLimiter>,
    /// Where hook signals go: live sessions by cwd, and stashed signals.
    /// Shared with the bus thread, which answers other nodes' hooks.
    pub(crate) hooks: Arc<HookIndex>,
    /// Reads transcripts off the shards' loops (PROTOCOL.md §5 inference).
    pub(crate) transcripts: Option<TranscriptReader>,
    pub started_at: Instant,
    /// With `NATS_URL`: the bus to the other nodes.
    pub(crate) cluster: Option<crate::cluster::Cluster>,
}

/// The membership could not be loaded (Postgres down or its queue full).
#[derive(Debug, thiserror::Error)]
#[error("membership unavailable")]
pub struct DirectoryUnavailable;

impl BrokerContext {
    /// The mesh for a hello, loaded from Postgres on first use or on a miss
    /// (no member with that id and key: it may just have been added, or its
    /// key rotated). `Ok(None)`: no such mesh (no member rows at all).
    pub async fn directory_lookup(
        &self,
        mesh_id: &str,
        member_id: &str,
        pubkey: &str,
    ) -> Result<Option<Arc<MeshEntry>>, DirectoryUnavailable> {
        let known = |mesh: &MeshEntry| {
            mesh.view()
                .member(member_id)
                .is_some_and(|m| m.pubkey.eq_ignore_ascii_case(pubkey))
        };
        if let Some(mesh) = self.directory.get(mesh_id) {
            if known(&mesh) {
                return Ok(Some(mesh));
            }
            let missed_at = Instant::now();
            let since = mesh.loaded_since();
            if since < MISS_RELOAD_AFTER {
                monoio::time::sleep(MISS_RELOAD_AFTER - since).await;
                // Reloaded meanwhile (by a refresh or another miss): that
                // load is newer than this hello, so its answer stands.
                if known(&mesh) || mesh.loaded_since() < missed_at.elapsed() {
                    return Ok(Some(mesh));
                }
            }
        }
        let answer = self
            .db
            .lookup_members(mesh_id)
            .ok_or(DirectoryUnavailable)?;
        let rows = answer
            .await
            .map_err(|_| DirectoryUnavailable)?
            .map_err(|_| DirectoryUnavailable)?;
        if rows.is_empty() && self.directory.get(mesh_id).is_none() {
            return Ok(None);
        }
        Ok(Some(self.directory.install(mesh_id, &rows)))
    }
}
