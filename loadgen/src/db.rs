//! Creates the run's meshes and members in the broker's database, and
//! removes them (and everything the broker wrote about them) afterwards.
use crate::roster::Roster;
use anyhow::{Context, Result};

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime")
        .block_on(f)
}

async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connect to --database-url")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// INSERT the meshes and members, in batches of rows via `unnest`.
pub fn create(url: &str, roster: &Roster) -> Result<()> {
    block_on(async {
        let client = connect(url).await?;
        let ids: Vec<&str> = roster.meshes.iter().map(|m| m.id.as_str()).collect();
        client
            .execute(
                "INSERT INTO mesh.mesh (id, name, slug, owner_user_id) \
                 SELECT id, id, id, 'meshbroker-loadgen' FROM unnest($1::text[]) AS t(id)",
                &[&ids],
            )
            .await
            .context("insert mesh.mesh rows")?;
        let rows: Vec<(&str, &str, &str)> = roster
            .meshes
            .iter()
            .flat_map(|mesh| {
                mesh.members
                    .iter()
                    .map(move |m| (m.id.as_str(), mesh.id.as_str(), m.pubkey.as_str()))
            })
            .collect();
        for chunk in rows.chunks(5000) {
            let ids: Vec<&str> = chunk.iter().map(|r| r.0).collect();
            let meshes: Vec<&str> = chunk.iter().map(|r| r.1).collect();
            let keys: Vec<&str> = chunk.iter().map(|r| r.2).collect();
            client
                .execute(
                    "INSERT INTO mesh.member (id, mesh_id, peer_pubkey, display_name) \
                     SELECT id, mesh_id, pk, id FROM unnest($1::text[], $2::text[], $3::text[]) AS t(id, mesh_id, pk)",
                    &[&ids, &meshes, &keys],
                )
                .await
                .context("insert mesh.member rows")?;
        }
        Ok(())
    })
}

/// DELETE the meshes and, explicitly (an existing claudemesh database may
/// lack some cascades), the rows hanging off them.
pub fn remove(url: &str, mesh_ids: &[String]) -> Result<()> {
    block_on(async {
        let client = connect(url).await?;
        let members = "SELECT id FROM mesh.member WHERE mesh_id = ANY($1)";
        // Group membership (PROTOCOL.md §10, `peers`): a claudemesh
        // database may have its own mesh.member_group, without the cascade
        // the broker's migration gives it, or none at all.
        let groups = client
            .query_one("SELECT to_regclass('mesh.member_group') IS NOT NULL", &[])
            .await
            .context("cleanup: look for mesh.member_group")?
            .get::<_, bool>(0)
            .then(|| format!("DELETE FROM mesh.member_group WHERE member_id IN ({members})"));
        for sql in groups.into_iter().chain([
            format!("DELETE FROM mesh.presence WHERE member_id IN ({members})"),
            "DELETE FROM mesh.message_queue WHERE mesh_id = ANY($1)".into(),
            "DELETE FROM mesh.audit_log WHERE mesh_id = ANY($1)".into(),
            "DELETE FROM mesh.member WHERE mesh_id = ANY($1)".into(),
            "DELETE FROM mesh.mesh WHERE id = ANY($1)".into(),
        ]) {
            // The broker may still be marking the run's held envelopes
            // delivered (after a client-ack run, for seconds on a loaded
            // box): a deadlock with it is retried, for up to 10 s.
            let mut attempt = 1;
            loop {
                match client.execute(&sql, &[&mesh_ids]).await {
                    Ok(_) => break,
                    Err(e)
                        if attempt < 20
                            && e.code()
                                == Some(
                                    &tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED,
                                ) =>
                    {
                        attempt += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                    Err(e) => return Err(e).with_context(|| format!("cleanup: {sql}")),
                }
            }
        }
        Ok(())
    })
}
