//! Member lookups for the membership directory, on the db thread: each
//! member row with its display name and its `mesh.member_group` rows.
//!
//! Hellos on a mesh the directory has not loaded (or that miss a member)
//! ask for its rows; every `member_refresh` all loaded meshes are reloaded
//! in one query, which is how revocations reach live sessions. This task
//! has its own connection so a lookup never queues behind the writer's
//! backlog (a hello must not wait for a batch of presence rows).
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{interval, timeout, MissedTickBehavior};
use tokio_postgres::{Client, Config};

use super::admin::AdminRequest;
use super::worker::{connect, ConnTask};
use super::{LookupFailed, MembersReply, WRITE_TIMEOUT};
use crate::mesh::directory::{Directory, MemberRow};

/// Every member row of the given meshes with its groups, in one round
/// trip: the lateral aggregate yields one row per member (empty arrays when
/// it has no group), names and roles in the same order, by name in byte
/// order (`COLLATE "C"`, whatever the database's locale).
const MEMBERS_SQL: &str = "\
SELECT m.mesh_id, m.id, m.peer_pubkey, m.revoked_at IS NOT NULL, m.display_name,
  COALESCE(g.names, '{}'::text[]), COALESCE(g.roles, '{}'::text[]), m.role::text = 'admin'
FROM mesh.member m
LEFT JOIN LATERAL (
  SELECT array_agg(mg.name::text ORDER BY mg.name COLLATE \"C\") AS names,
    array_agg(mg.role::text ORDER BY mg.name COLLATE \"C\") AS roles
  FROM mesh.member_group mg
  WHERE mg.member_id = m.id
) g ON true
WHERE m.mesh_id = ANY($1)";

/// The most lookups answered by one query.
const LOOKUP_BATCH: usize = 1024;

pub(crate) struct MemberLoader {
    config: Config,
    requests: mpsc::Receiver<(String, MembersReply)>,
    /// Admin reads and writes (PROTOCOL.md §13), on this task so that an
    /// unban and the refreshes never interleave.
    admin: mpsc::Receiver<AdminRequest>,
    directory: Option<Arc<Directory>>,
    refresh: Duration,
    conn: Option<(Client, ConnTask)>,
}

impl MemberLoader {
    pub(crate) fn new(
        config: Config,
        requests: mpsc::Receiver<(String, MembersReply)>,
        admin: mpsc::Receiver<AdminRequest>,
        directory: Option<Arc<Directory>>,
        refresh: Duration,
    ) -> Self {
        MemberLoader {
            config,
            requests,
            admin,
            directory,
            refresh,
            conn: None,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut tick = interval(self.refresh);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                request = self.requests.recv() => match request {
                    None => return,
                    Some(first) => self.answer_lookups(first).await,
                },
                Some(request) = self.admin.recv() => self.answer_admin(request).await,
                _ = tick.tick() => self.refresh_directory().await,
            }
        }
    }

    /// Answers `first` and every lookup already waiting behind it with one
    /// query. A reconnect storm on a cold directory asks for each mesh once
    /// per hello: one query per lookup fell behind and filled the queue,
    /// refusing hellos `unavailable` with Postgres up.
    async fn answer_lookups(&mut self, first: (String, MembersReply)) {
        let mut waiting = vec![first];
        while waiting.len() < LOOKUP_BATCH {
            match self.requests.try_recv() {
                Ok(request) => waiting.push(request),
                Err(_) => break,
            }
        }
        let mut mesh_ids: Vec<String> = waiting.iter().map(|(mesh, _)| mesh.clone()).collect();
        mesh_ids.sort_unstable();
        mesh_ids.dedup();
        match self.load(&mesh_ids).await {
            Ok(rows) => {
                let mut by_mesh: HashMap<String, Vec<MemberRow>> = HashMap::new();
                for (mesh, row) in rows {
                    by_mesh.entry(mesh).or_default().push(row);
                }
                for (mesh_id, reply) in waiting {
                    let mesh_rows = by_mesh.get(&mesh_id).cloned().unwrap_or_default();
                    let _ = reply.send(Ok(mesh_rows));
                }
            }
            Err(e) => {
                for (_, reply) in waiting {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    async fn refresh_directory(&mut self) {
        let Some(directory) = self.directory.clone() else {
            return;
        };
        directory.evict_idle();
        let mesh_ids = directory.mesh_ids();
        if mesh_ids.is_empty() {
            return;
        }
        // Postgres down: keep the views we have; they refresh once it is back.
        let Ok(rows) = self.load(&mesh_ids).await else {
            return;
        };
        for mesh_id in &mesh_ids {
            let mesh_rows: Vec<MemberRow> = rows
                .iter()
                .filter(|(mesh, _)| mesh == mesh_id)
                .map(|(_, row)| row.clone())
                .collect();
            directory.install(mesh_id, &mesh_rows);
        }
    }

    /// This task's connection, (re)opened when needed.
    pub(super) async fn client(&mut self) -> Result<&Client, LookupFailed> {
        if self
            .conn
            .as_ref()
            .is_none_or(|(client, _)| client.is_closed())
        {
            let (client, task) = connect(&self.config)
                .await
                .map_err(|e| LookupFailed(e.to_string()))?;
            self.conn = Some((client, task));
        }
        Ok(&self.conn.as_ref().expect("connected above").0)
    }

    pub(super) fn directory(&self) -> Option<&Arc<Directory>> {
        self.directory.as_ref()
    }

    /// A failed query: the connection is dropped, to be opened again.
    pub(super) fn failed(&mut self, e: impl std::fmt::Display) -> LookupFailed {
        self.conn = None;
        LookupFailed(e.to_string())
    }

    /// `(mesh_id, row)` for every member row of the given meshes.
    pub(super) async fn load(
        &mut self,
        mesh_ids: &[String],
    ) -> Result<Vec<(String, MemberRow)>, LookupFailed> {
        let client = self.client().await?;
        match timeout(WRITE_TIMEOUT, query_members(client, mesh_ids)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => {
                self.conn = None;
                Err(LookupFailed(e.to_string()))
            }
            Err(_) => {
                self.conn = None;
                Err(LookupFailed("member lookup timed out".to_owned()))
            }
        }
    }
}

/// A mesh's member rows reloaded for the bus thread (README "Several
/// nodes"), over a connection of its own (it has no other): another node
/// unbanned `reinstated`, or another node's part lists a member this node
/// has not loaded yet.
pub(crate) async fn reload_members(
    db: &Config,
    directory: &Directory,
    mesh_id: &str,
    reinstated: Option<&str>,
) -> Result<(), super::DbError> {
    let (client, task) = connect(db).await?;
    let mesh_ids = [mesh_id.to_owned()];
    let rows = match timeout(WRITE_TIMEOUT, query_members(&client, &mesh_ids)).await {
        Ok(rows) => rows?,
        Err(_) => return Err(super::DbError::Timeout("reloading a mesh's members")),
    };
    let rows: Vec<MemberRow> = rows.into_iter().map(|(_, row)| row).collect();
    match reinstated {
        Some(member_id) => directory.reinstate(mesh_id, &rows, member_id),
        None => {
            directory.install(mesh_id, &rows);
        }
    }
    drop(client);
    let _ = task.await;
    Ok(())
}

/// `(mesh_id, row)` for every member row of the given meshes, each with
/// its display name and its `mesh.member_group` rows (ordered by name).
pub(crate) async fn query_members(
    client: &Client,
    mesh_ids: &[String],
) -> Result<Vec<(String, MemberRow)>, tokio_postgres::Error> {
    let rows = client.query(MEMBERS_SQL, &[&mesh_ids]).await?;
    rows.iter()
        .map(|row| {
            let names: Vec<String> = row.try_get(5)?;
            let roles: Vec<Option<String>> = row.try_get(6)?;
            Ok((
                row.try_get::<_, String>(0)?,
                MemberRow {
                    id: row.try_get(1)?,
                    peer_pubkey: row.try_get(2)?,
                    revoked: row.try_get(3)?,
                    display_name: row.try_get(4)?,
                    groups: names.into_iter().zip(roles).collect(),
                    admin: row.try_get(7)?,
                },
            ))
        })
        .collect()
}
