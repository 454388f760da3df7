//! Enrollment (PROTOCOL.md §12), black box against a real broker and a real
//! Postgres: migration 0008 on an empty and on an existing claudemesh
//! database, `POST /join` with every error code of the contract in its
//! check order, idempotent re-joins that take no use, five concurrent joins
//! of a one-use invite, the new member's hello admitted at once, the
//! `member_joined` audit row, the per-address rate limit, and the
//! `mesh create` + `invite` commands making a token that `/join` takes.
//!
//! Invites are signed here with ed25519 over the contract's canonical
//! string, independently of the broker's own code.
mod common;
mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{exec_sql, http, pg, query_rows, run_broker_capture, Broker, HttpReply};
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{json, Value};
use support::*;

const FIXTURE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/claudemesh-existing-schema.sql"
));

/// Most tests send more joins than the default 20 a minute.
const MANY_JOINS: (&str, &str) = ("JOIN_RATE_LIMIT_PER_MIN", "100000");

const ROOT_KEY: &str = "cm9vdC1rZXktb2YtdGhlLW1lc2g";

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn db_name(url: &str) -> &str {
    url.rsplit('/').next().expect("database in url")
}

// ------------------------------------------------------------------ seeding

/// A mesh with an owner key and a root key.
struct OwnedMesh {
    id: String,
    slug: String,
    owner: SigningKey,
}

fn owned_mesh(db: &str, mesh_id: &str) -> OwnedMesh {
    create_mesh(db, mesh_id);
    let owner = new_key();
    exec_sql(
        db,
        &format!(
            "UPDATE mesh.mesh SET owner_pubkey = '{}', root_key = '{ROOT_KEY}' WHERE id = '{mesh_id}'",
            pubkey_hex(&owner)
        ),
    );
    OwnedMesh {
        id: mesh_id.to_owned(),
        slug: format!("slug-{mesh_id}"),
        owner,
    }
}

/// A `mesh.invite` row expiring `expires_in` seconds from now (negative:
/// expired).
fn insert_invite(db: &str, mesh_id: &str, token: &str, max_uses: i32, role: &str, expires_in: i64) {
    exec_sql(
        db,
        &format!(
            "INSERT INTO mesh.invite (id, mesh_id, token, max_uses, role, expires_at, created_by) \
             VALUES ('inv-{token}', '{mesh_id}', '{token}', {max_uses}, '{role}', \
             (now() AT TIME ZONE 'UTC') + interval '{expires_in} seconds', 'owner-{mesh_id}')"
        ),
    );
}

fn used_count(db: &str, token: &str) -> i32 {
    query_rows(
        db,
        &format!("SELECT used_count FROM mesh.invite WHERE token = '{token}'"),
    )[0]
    .get(0)
}

fn member_count(db: &str, mesh_id: &str) -> i64 {
    query_rows(
        db,
        &format!("SELECT count(*) FROM mesh.member WHERE mesh_id = '{mesh_id}'"),
    )[0]
    .get(0)
}

// ----------------------------------------------------------------- requests

/// The invite payload, signed by `signer` over the contract's string.
fn signed_payload(
    signer: &SigningKey,
    owner_pubkey: &str,
    mesh: &OwnedMesh,
    role: &str,
    expires_at: i64,
    root_key: &str,
) -> Value {
    let canonical = format!(
        "1|{}|{}|wss://broker.test/ws|{expires_at}|{root_key}|{role}|{owner_pubkey}",
        mesh.id, mesh.slug
    );
    json!({
        "v": 1,
        "mesh_id": mesh.id,
        "mesh_slug": mesh.slug,
        "broker_url": "wss://broker.test/ws",
        "expires_at": expires_at,
        "mesh_root_key": root_key,
        "role": role,
        "owner_pubkey": owner_pubkey,
        "signature": hex(&signer.sign(canonical.as_bytes()).to_bytes()),
    })
}

/// A correct payload for `mesh` by its owner, expiring in an hour.
fn payload(mesh: &OwnedMesh, role: &str) -> Value {
    signed_payload(
        &mesh.owner,
        &pubkey_hex(&mesh.owner),
        mesh,
        role,
        unix_now() + 3600,
        ROOT_KEY,
    )
}

fn join_body(token: &str, payload: &Value, peer: &SigningKey, name: &str) -> Value {
    json!({
        "invite_token": token,
        "invite_payload": payload,
        "peer_pubkey": pubkey_hex(peer),
        "display_name": name,
    })
}

fn post_join(broker: &Broker, body: &[u8]) -> HttpReply {
    http(
        broker.addr(),
        "POST",
        "/join",
        &[("Content-Type", "application/json")],
        body,
    )
}

fn join(broker: &Broker, body: &Value) -> HttpReply {
    post_join(broker, body.to_string().as_bytes())
}

/// Asserts a refusal: `status`, `error` = `code`, a non-empty message.
fn assert_refused(reply: &HttpReply, status: u16, code: &str) -> Value {
    let v = reply.json();
    assert_eq!(reply.status, status, "expected {code}: {v}");
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"], code, "{v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message: {v}"
    );
    assert_eq!(reply.header("Access-Control-Allow-Origin"), Some("*"));
    v
}

/// Asserts a 200 and returns (memberId, alreadyMember).
fn assert_joined(reply: &HttpReply) -> (String, bool) {
    let v = reply.json();
    assert_eq!(reply.status, 200, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    let id = v["memberId"].as_str().expect("memberId").to_owned();
    assert!(!id.is_empty());
    (id, v["alreadyMember"].as_bool().expect("alreadyMember"))
}

fn member_of(mesh: &OwnedMesh, id: &str, key: SigningKey) -> Member {
    Member {
        mesh_id: mesh.id.clone(),
        id: id.to_owned(),
        pubkey: pubkey_hex(&key),
        key,
    }
}

// --------------------------------------------------------------- migrations

async fn client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

async fn column(c: &tokio_postgres::Client, table: &str, col: &str) -> Option<(String, bool)> {
    c.query_opt(
        "SELECT format_type(a.atttypid, a.atttypmod), NOT a.attnotnull
         FROM pg_attribute a
         JOIN pg_class t ON t.oid = a.attrelid
         JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE n.nspname = 'mesh' AND t.relname = $1 AND a.attname = $2
           AND a.attnum > 0 AND NOT a.attisdropped",
        &[&table, &col],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1)))
}

async fn assert_join_columns(c: &tokio_postgres::Client) {
    for col in ["owner_pubkey", "root_key"] {
        assert_eq!(
            column(c, "mesh", col).await,
            Some(("text".to_owned(), true)),
            "mesh.mesh.{col}"
        );
    }
    // mesh.invite as the web app declares it (0001 makes it where missing).
    for (col, ty, nullable) in [
        ("id", "text", false),
        ("mesh_id", "text", false),
        ("token", "text", false),
        ("max_uses", "integer", false),
        ("used_count", "integer", false),
        ("role", "mesh.role", false),
        ("expires_at", "timestamp without time zone", false),
        ("created_by", "text", false),
        ("created_at", "timestamp without time zone", false),
        ("revoked_at", "timestamp without time zone", true),
    ] {
        assert_eq!(
            column(c, "invite", col).await,
            Some((ty.to_owned(), nullable)),
            "mesh.invite.{col}"
        );
    }
}

#[tokio::test]
async fn migration_0008_on_an_empty_database_is_idempotent() {
    let url = common::fresh_database();
    let mut c = client(&url).await;
    let all = meshbroker::db::migrate::MIGRATIONS.len();
    assert_eq!(meshbroker::db::run_migrations(&mut c).await.unwrap(), all);
    assert_join_columns(&c).await;
    assert_eq!(meshbroker::db::run_migrations(&mut c).await.unwrap(), 0);
    // The file itself runs again cleanly (what an existing database sees).
    let sql = include_str!("../migrations/0008_join.sql");
    c.batch_execute(sql).await.unwrap();
    c.batch_execute(sql).await.unwrap();
    assert_join_columns(&c).await;
}

#[tokio::test]
async fn migration_0008_on_the_claudemesh_fixture_keeps_rows_and_columns() {
    let url = common::fresh_database();
    pg().run_sql(db_name(&url), FIXTURE).expect("load fixture");
    let mut c = client(&url).await;
    c.batch_execute(
        "INSERT INTO public.\"user\" (id) VALUES ('u-1');
         INSERT INTO mesh.mesh (id, name, slug, owner_user_id) VALUES ('m-old', 'Old', 'old', 'u-1');
         INSERT INTO mesh.invite (id, mesh_id, token, expires_at, created_by)
           VALUES ('i-1', 'm-old', 'tok-old', '2030-01-01', 'u-1');",
    )
    .await
    .unwrap();
    let all = meshbroker::db::migrate::MIGRATIONS.len();
    assert_eq!(meshbroker::db::run_migrations(&mut c).await.unwrap(), all);
    assert_eq!(meshbroker::db::run_migrations(&mut c).await.unwrap(), 0);
    assert_join_columns(&c).await;
    let row = c
        .query_one(
            "SELECT owner_pubkey, root_key FROM mesh.mesh WHERE id = 'm-old'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<&str>>(0), None);
    assert_eq!(row.get::<_, Option<&str>>(1), None);
    let invite = c
        .query_one(
            "SELECT max_uses, used_count, role::text FROM mesh.invite WHERE token = 'tok-old'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(invite.get::<_, i32>(0), 1);
    assert_eq!(invite.get::<_, i32>(1), 0);
    assert_eq!(invite.get::<_, &str>(2), "member");
}

#[tokio::test]
async fn columns_the_web_app_already_made_keep_their_values() {
    let url = common::fresh_database();
    pg().run_sql(db_name(&url), FIXTURE).expect("load fixture");
    let mut c = client(&url).await;
    c.batch_execute(
        "ALTER TABLE mesh.mesh ADD COLUMN owner_pubkey text, ADD COLUMN root_key text;
         INSERT INTO public.\"user\" (id) VALUES ('u-1');
         INSERT INTO mesh.mesh (id, name, slug, owner_user_id, owner_pubkey, root_key)
           VALUES ('m-1', 'One', 'one', 'u-1', 'abcd', 'rk');",
    )
    .await
    .unwrap();
    meshbroker::db::run_migrations(&mut c).await.unwrap();
    let row = c
        .query_one(
            "SELECT owner_pubkey, root_key FROM mesh.mesh WHERE id = 'm-1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "abcd");
    assert_eq!(row.get::<_, &str>(1), "rk");
}

// ------------------------------------------------------------------- joins

#[test]
fn a_join_inserts_the_member_audits_it_and_its_hello_is_admitted_at_once() {
    // No periodic refresh in the test's time: the join's own reload puts
    // the member in the loaded mesh.
    let b = start(&[MANY_JOINS, ("MEMBER_REFRESH_SECONDS", "3600")]);
    let mesh = owned_mesh(&b.db, "j1");
    let old = add_member(&b.db, "j1", "j1-old");
    // The mesh is loaded (a live session) before the join.
    let mut old_peer = Peer::connect(&b, &old);
    insert_invite(&b.db, "j1", "tok-j1", 3, "admin", 3600);

    let alice = new_key();
    let reply = join(
        &b,
        &join_body("tok-j1", &payload(&mesh, "admin"), &alice, "Alice ✨"),
    );
    let (id, already) = assert_joined(&reply);
    assert!(!already);
    assert_eq!(used_count(&b.db, "tok-j1"), 1);
    let row = &query_rows(
        &b.db,
        &format!(
            "SELECT mesh_id, peer_pubkey, display_name, role::text, revoked_at IS NULL \
             FROM mesh.member WHERE id = '{id}'"
        ),
    )[0];
    assert_eq!(row.get::<_, &str>(0), "j1");
    assert_eq!(row.get::<_, &str>(1), pubkey_hex(&alice));
    assert_eq!(row.get::<_, &str>(2), "Alice ✨");
    assert_eq!(row.get::<_, &str>(3), "admin");
    assert!(row.get::<_, bool>(4));

    // Right after the 200: admitted, and reachable by the member already there.
    let member = member_of(&mesh, &id, alice);
    let mut peer = Peer::connect(&b, &member);
    old_peer.send(&member.pubkey, "now", "bm9uY2U=", "Y2lwaGVy", "s1");
    let push = peer.recv_push(WAIT);
    assert_eq!(push["senderPubkey"], old.pubkey.as_str());

    let audited = poll(WAIT, || {
        let rows = query_rows(
            &b.db,
            "SELECT actor_peer_id, metadata::text FROM mesh.audit_log \
             WHERE mesh_id = 'j1' AND event_type = 'member_joined'",
        );
        rows.len() == 1 && {
            let metadata: Value = serde_json::from_str(rows[0].get::<_, &str>(1)).unwrap();
            rows[0].get::<_, Option<&str>>(0) == Some(id.as_str())
                && metadata == json!({"memberId": id, "role": "admin"})
        }
    });
    assert!(audited, "no member_joined row for {id}");
    b.wait_for_log_where("join", WAIT, |v| {
        v["outcome"] == "joined" && v["member"] == id.as_str()
    });
}

#[test]
fn a_rejoin_answers_the_same_member_and_takes_no_use() {
    let b = start(&[MANY_JOINS]);
    let mesh = owned_mesh(&b.db, "j2");
    insert_invite(&b.db, "j2", "tok-j2", 1, "member", 3600);
    let key = new_key();
    let body = join_body("tok-j2", &payload(&mesh, "member"), &key, "bob");
    let (id, already) = assert_joined(&join(&b, &body));
    assert!(!already);
    assert_eq!(used_count(&b.db, "tok-j2"), 1);

    // The invite is used up, yet the same key is answered as a member
    // (step 5 comes before step 6), in either hex case.
    for _ in 0..2 {
        let (again, already) = assert_joined(&join(&b, &body));
        assert_eq!(again, id);
        assert!(already);
    }
    let mut upper = body.clone();
    upper["peer_pubkey"] = json!(pubkey_hex(&key).to_ascii_uppercase());
    assert_eq!(assert_joined(&join(&b, &upper)), (id.clone(), true));
    assert_eq!(used_count(&b.db, "tok-j2"), 1);
    assert_eq!(member_count(&b.db, "j2"), 1);

    // Another key on the used-up invite is refused.
    let other = join_body("tok-j2", &payload(&mesh, "member"), &new_key(), "eve");
    assert_refused(&join(&b, &other), 400, "invite_exhausted");

    // A revoked member is no member: its key joins anew with a use.
    exec_sql(
        &b.db,
        &format!("UPDATE mesh.member SET revoked_at = now() WHERE id = '{id}'"),
    );
    insert_invite(&b.db, "j2", "tok-j2b", 1, "member", 3600);
    let body = join_body("tok-j2b", &payload(&mesh, "member"), &key, "bob");
    let (fresh, already) = assert_joined(&join(&b, &body));
    assert!(!already);
    assert_ne!(fresh, id);
    assert_eq!(used_count(&b.db, "tok-j2b"), 1);
}

#[test]
fn five_concurrent_joins_of_a_one_use_invite_admit_exactly_one() {
    let b = start(&[MANY_JOINS, ("BROKER_SHARDS", "4")]);
    let mesh = owned_mesh(&b.db, "j3");
    insert_invite(&b.db, "j3", "tok-j3", 1, "member", 3600);
    let bodies: Vec<String> = (0..5)
        .map(|i| {
            join_body(
                "tok-j3",
                &payload(&mesh, "member"),
                &new_key(),
                &format!("p{i}"),
            )
            .to_string()
        })
        .collect();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(bodies.len()));
    let addr = b.addr();
    let threads: Vec<_> = bodies
        .into_iter()
        .map(|body| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                http(
                    addr,
                    "POST",
                    "/join",
                    &[("Content-Type", "application/json")],
                    body.as_bytes(),
                )
            })
        })
        .collect();
    let replies: Vec<HttpReply> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let won: Vec<&HttpReply> = replies.iter().filter(|r| r.status == 200).collect();
    assert_eq!(
        won.len(),
        1,
        "{:?}",
        replies.iter().map(|r| r.text()).collect::<Vec<_>>()
    );
    for r in replies.iter().filter(|r| r.status != 200) {
        assert_refused(r, 400, "invite_exhausted");
    }
    assert_eq!(used_count(&b.db, "tok-j3"), 1);
    assert_eq!(member_count(&b.db, "j3"), 1);
}

#[test]
fn every_refusal_has_its_code_in_the_contracts_order() {
    let b = start(&[MANY_JOINS, ("MAX_MESSAGE_BYTES", "4096")]);
    let db = &b.db;
    let mesh = owned_mesh(db, "j4");
    owned_mesh(db, "j4-other");
    insert_invite(db, "j4", "tok-ok", 5, "member", 3600);
    let good = payload(&mesh, "member");
    let peer = new_key();
    let body = |token: &str, payload: &Value| join_body(token, payload, &peer, "carol");

    // 1. Fields: each names the field it is about.
    let mut cases: Vec<(Value, &str)> = Vec::new();
    let mut no_name = body("tok-ok", &good);
    no_name.as_object_mut().unwrap().remove("display_name");
    cases.push((no_name, "display_name"));
    let mut long_name = body("tok-ok", &good);
    long_name["display_name"] = json!("x".repeat(65));
    cases.push((long_name, "display_name"));
    let mut bad_key = body("tok-ok", &good);
    bad_key["peer_pubkey"] = json!("abc");
    cases.push((bad_key, "peer_pubkey"));
    let mut bad_owner = body("tok-ok", &good);
    bad_owner["invite_payload"]["owner_pubkey"] = json!("g".repeat(64));
    cases.push((bad_owner, "owner_pubkey"));
    let mut no_token = body("tok-ok", &good);
    no_token.as_object_mut().unwrap().remove("invite_token");
    cases.push((no_token, "invite_token"));
    for (case, field) in cases {
        let v = assert_refused(&join(&b, &case), 400, "invalid_field");
        assert!(
            v["message"].as_str().unwrap().contains(field),
            "{field}: {v}"
        );
    }
    let v = assert_refused(&post_join(&b, b"{not json"), 400, "invalid_field");
    assert!(v["message"].as_str().unwrap().contains("body"), "{v}");
    // A bad field outranks a bad signature.
    let mut both = body("tok-ok", &good);
    both["invite_payload"]["mesh_slug"] = json!("tampered");
    both["display_name"] = json!("");
    assert_refused(&join(&b, &both), 400, "invalid_field");

    // 2. The signature, before any row is looked at (this mesh does not exist).
    let mut tampered = body("tok-ok", &good);
    tampered["invite_payload"]["mesh_id"] = json!("no-such-mesh");
    assert_refused(&join(&b, &tampered), 400, "invite_bad_signature");
    let stranger = new_key();
    let forged = signed_payload(
        &stranger,
        &pubkey_hex(&mesh.owner),
        &mesh,
        "member",
        unix_now() + 3600,
        ROOT_KEY,
    );
    assert_refused(
        &join(&b, &body("tok-ok", &forged)),
        400,
        "invite_bad_signature",
    );

    // 3. The mesh: missing, archived, without an owner key, another owner,
    // another root key.
    let ghost = OwnedMesh {
        id: "j4-ghost".into(),
        slug: "ghost".into(),
        owner: new_key(),
    };
    assert_refused(
        &join(&b, &body("tok-ok", &payload(&ghost, "member"))),
        400,
        "mesh_not_found",
    );
    let archived = owned_mesh(db, "j4-archived");
    exec_sql(
        db,
        "UPDATE mesh.mesh SET archived_at = now() WHERE id = 'j4-archived'",
    );
    assert_refused(
        &join(&b, &body("tok-ok", &payload(&archived, "member"))),
        400,
        "mesh_not_found",
    );
    let keyless = owned_mesh(db, "j4-keyless");
    exec_sql(
        db,
        "UPDATE mesh.mesh SET owner_pubkey = NULL WHERE id = 'j4-keyless'",
    );
    assert_refused(
        &join(&b, &body("tok-ok", &payload(&keyless, "member"))),
        400,
        "mesh_missing_owner_key",
    );
    let impostor = OwnedMesh {
        id: mesh.id.clone(),
        slug: mesh.slug.clone(),
        owner: new_key(),
    };
    assert_refused(
        &join(&b, &body("tok-ok", &payload(&impostor, "member"))),
        400,
        "invite_owner_mismatch",
    );
    let other_root = signed_payload(
        &mesh.owner,
        &pubkey_hex(&mesh.owner),
        &mesh,
        "member",
        unix_now() + 3600,
        "another-root-key",
    );
    assert_refused(
        &join(&b, &body("tok-ok", &other_root)),
        400,
        "invite_root_key_mismatch",
    );

    // 4. The invite: unknown token, another mesh's, revoked, expired (its
    // row, or the payload), another role.
    assert_refused(&join(&b, &body("tok-none", &good)), 400, "invite_not_found");
    insert_invite(db, "j4-other", "tok-other", 5, "member", 3600);
    assert_refused(
        &join(&b, &body("tok-other", &good)),
        400,
        "invite_mesh_mismatch",
    );
    insert_invite(db, "j4", "tok-revoked", 5, "member", 3600);
    exec_sql(
        db,
        "UPDATE mesh.invite SET revoked_at = now() WHERE token = 'tok-revoked'",
    );
    assert_refused(
        &join(&b, &body("tok-revoked", &good)),
        400,
        "invite_revoked",
    );
    insert_invite(db, "j4", "tok-expired", 5, "member", -60);
    assert_refused(
        &join(&b, &body("tok-expired", &good)),
        400,
        "invite_expired",
    );
    let stale = signed_payload(
        &mesh.owner,
        &pubkey_hex(&mesh.owner),
        &mesh,
        "member",
        unix_now() - 60,
        ROOT_KEY,
    );
    assert_refused(&join(&b, &body("tok-ok", &stale)), 400, "invite_expired");
    assert_refused(
        &join(&b, &body("tok-ok", &payload(&mesh, "admin"))),
        400,
        "invite_role_mismatch",
    );

    // 6. No use left.
    insert_invite(db, "j4", "tok-spent", 2, "member", 3600);
    exec_sql(
        db,
        "UPDATE mesh.invite SET used_count = 2 WHERE token = 'tok-spent'",
    );
    assert_refused(
        &join(&b, &body("tok-spent", &good)),
        400,
        "invite_exhausted",
    );

    // Over MAX_MESSAGE_BYTES: 413 too_large; exactly at it: read and judged.
    let big = vec![b' '; 4097];
    assert_refused(&post_join(&b, &big), 413, "too_large");
    let mut exact = body("tok-ok", &good).to_string().into_bytes();
    exact.resize(4096, b' ');
    assert_joined(&post_join(&b, &exact));

    // Nothing refused took a use or wrote a member.
    assert_eq!(used_count(db, "tok-ok"), 1);
    assert_eq!(used_count(db, "tok-spent"), 2);
    assert_eq!(member_count(db, "j4"), 1);
}

#[test]
fn other_methods_and_the_preflight() {
    let b = start(&[]);
    let reply = http(b.addr(), "GET", "/join", &[], b"");
    assert_eq!(reply.status, 405);
    assert!(reply.header("Allow").is_some_and(|a| a.contains("POST")));
    let reply = http(b.addr(), "OPTIONS", "/join", &[], b"");
    assert_eq!(reply.status, 204);
    assert_eq!(reply.header("Access-Control-Allow-Origin"), Some("*"));
}

#[test]
fn the_rate_limit_counts_every_request_per_address() {
    let b = start(&[("JOIN_RATE_LIMIT_PER_MIN", "3")]);
    let mesh = owned_mesh(&b.db, "j5");
    insert_invite(&b.db, "j5", "tok-j5", 5, "member", 3600);
    // Refused requests count too.
    for _ in 0..2 {
        assert_refused(&post_join(&b, b"{}"), 400, "invalid_field");
    }
    let body = join_body("tok-j5", &payload(&mesh, "member"), &new_key(), "dan");
    assert_joined(&join(&b, &body));
    // The fourth in the minute: refused before anything else is looked at,
    // a valid join, a bad one and one over the size limit alike.
    assert_refused(&join(&b, &body), 429, "rate_limited");
    assert_refused(&post_join(&b, b"{}"), 429, "rate_limited");
    assert_refused(&post_join(&b, &vec![b' '; 70_000]), 429, "rate_limited");
    assert_eq!(used_count(&b.db, "tok-j5"), 1);
    // Other routes are not limited by it.
    assert_eq!(http(b.addr(), "GET", "/health/live", &[], b"").status, 200);
}

#[test]
fn a_join_on_an_existing_claudemesh_database() {
    let db = common::fresh_database();
    pg().run_sql(db_name(&db), FIXTURE).expect("load fixture");
    exec_sql(
        &db,
        "INSERT INTO public.\"user\" (id) VALUES ('owner-j6');
         INSERT INTO mesh.mesh (id, name, slug, owner_user_id) VALUES ('j6', 'Six', 'slug-j6', 'owner-j6');",
    );
    let b = Broker::start(&[("DATABASE_URL", db.as_str())]);
    b.wait_for_log("db healthy", WAIT);
    let owner = new_key();
    exec_sql(
        &db,
        &format!(
            "UPDATE mesh.mesh SET owner_pubkey = '{}', root_key = '{ROOT_KEY}' WHERE id = 'j6'",
            pubkey_hex(&owner)
        ),
    );
    let mesh = OwnedMesh {
        id: "j6".into(),
        slug: "slug-j6".into(),
        owner,
    };
    insert_invite(&db, "j6", "tok-j6", 1, "member", 3600);
    let key = new_key();
    let (id, _) = assert_joined(&join(
        &b,
        &join_body("tok-j6", &payload(&mesh, "member"), &key, "erin"),
    ));
    Peer::connect(&b, &member_of(&mesh, &id, key));
}

// ---------------------------------------------------------------- commands

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{out}"))
}

#[test]
fn mesh_create_and_invite_make_a_token_that_join_takes() {
    let db = common::fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("owner.key");
    let key_path = key_file.to_str().unwrap();
    let env = [("DATABASE_URL", db.as_str())];

    let (status, out, err) = run_broker_capture(
        &[
            "mesh",
            "create",
            "--name",
            "Team Seven",
            "--owner-key",
            key_path,
        ],
        &env,
    );
    assert_eq!(status.code(), Some(0), "{out}\n{err}");
    assert!(line(&out, "owner key: ").starts_with("created"), "{out}");
    let owner_pubkey = line(&out, "owner pubkey: ").to_owned();
    let mesh_id = line(&out, "mesh: ").to_owned();
    assert_eq!(line(&out, "slug: "), "team-seven");
    let text = std::fs::read_to_string(&key_file).unwrap();
    let mut seed = [0u8; 32];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text.trim()[2 * i..2 * i + 2], 16).unwrap();
    }
    assert_eq!(pubkey_hex(&SigningKey::from_bytes(&seed)), owner_pubkey);
    let row = &query_rows(
        &db,
        &format!("SELECT owner_pubkey, root_key, slug FROM mesh.mesh WHERE id = '{mesh_id}'"),
    )[0];
    assert_eq!(row.get::<_, &str>(0), owner_pubkey);
    let root_key: String = row.get(1);
    assert!(!root_key.is_empty());

    // A second mesh with the same key file reuses the key.
    let (status, out2, err) = run_broker_capture(
        &[
            "mesh",
            "create",
            "--name",
            "Other",
            "--slug",
            "other",
            "--owner-key",
            key_path,
        ],
        &env,
    );
    assert_eq!(status.code(), Some(0), "{out2}\n{err}");
    assert_eq!(line(&out2, "owner pubkey: "), owner_pubkey);
    assert!(!line(&out2, "owner key: ").starts_with("created"));

    let (status, out, err) = run_broker_capture(
        &[
            "invite",
            "--mesh",
            &mesh_id,
            "--max-uses",
            "2",
            "--expires",
            "1d",
            "--role",
            "admin",
            "--owner-key",
            key_path,
            "--broker-url",
            "wss://broker.test/ws",
        ],
        &env,
    );
    assert_eq!(status.code(), Some(0), "{out}\n{err}");
    let payload: Value = serde_json::from_str(line(&out, "payload: ")).unwrap();
    let token = line(&out, "token: ").to_owned();
    assert_eq!(line(&out, "link: "), format!("ic://join/{token}"));
    assert_eq!(payload["mesh_id"], mesh_id.as_str());
    assert_eq!(payload["mesh_slug"], "team-seven");
    assert_eq!(payload["role"], "admin");
    assert_eq!(payload["owner_pubkey"], owner_pubkey.as_str());
    assert_eq!(payload["mesh_root_key"], root_key.as_str());
    assert_eq!(payload["broker_url"], "wss://broker.test/ws");
    let expires = payload["expires_at"].as_i64().unwrap();
    assert!((expires - unix_now() - 86_400).abs() < 60, "{payload}");
    // The token is base64url of the payload, and the row's token.
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&token)
        .unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&decoded).unwrap(), payload);
    let invite = &query_rows(
        &db,
        &format!("SELECT max_uses, role::text, mesh_id FROM mesh.invite WHERE token = '{token}'"),
    )[0];
    assert_eq!(invite.get::<_, i32>(0), 2);
    assert_eq!(invite.get::<_, &str>(1), "admin");

    // The broker takes it.
    let b = Broker::start(&[("DATABASE_URL", db.as_str())]);
    b.wait_for_log("db healthy", WAIT);
    let key = new_key();
    let body = json!({
        "invite_token": token,
        "invite_payload": payload,
        "peer_pubkey": pubkey_hex(&key),
        "display_name": "frank",
    });
    let (id, already) = assert_joined(&join(&b, &body));
    assert!(!already);
    let role: String = query_rows(
        &db,
        &format!("SELECT role::text FROM mesh.member WHERE id = '{id}'"),
    )[0]
    .get(0);
    assert_eq!(role, "admin");
    let member = Member {
        mesh_id: mesh_id.clone(),
        id,
        pubkey: pubkey_hex(&key),
        key,
    };
    Peer::connect(&b, &member);
}

#[test]
fn the_commands_refuse_bad_arguments_and_keys() {
    let db = common::fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("owner.key");
    let key_path = key_path.to_str().unwrap();
    let env = [("DATABASE_URL", db.as_str())];
    for args in [
        &["mesh"][..],
        &["mesh", "create", "--owner-key", key_path],
        &["invite", "--mesh", "x"],
        &[
            "invite",
            "--mesh",
            "x",
            "--owner-key",
            key_path,
            "--role",
            "owner",
        ],
    ] {
        let (status, _, err) = run_broker_capture(args, &env);
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("usage"), "{args:?}: {err}");
    }
    // invite never creates a key, and needs the mesh's own owner key.
    let (status, _, err) =
        run_broker_capture(&["invite", "--mesh", "x", "--owner-key", key_path], &env);
    assert_eq!(status.code(), Some(1), "{err}");
    let (status, out, err) = run_broker_capture(
        &["mesh", "create", "--name", "m", "--owner-key", key_path],
        &env,
    );
    assert_eq!(status.code(), Some(0), "{err}");
    let mesh_id = line(&out, "mesh: ").to_owned();
    let other = dir.path().join("other.key");
    std::fs::write(&other, format!("{}\n", hex(&[5u8; 32]))).unwrap();
    let (status, _, err) = run_broker_capture(
        &[
            "invite",
            "--mesh",
            &mesh_id,
            "--owner-key",
            other.to_str().unwrap(),
        ],
        &env,
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("not the owner key"), "{err}");
}

#[test]
fn join_rate_limit_is_validated_and_shown() {
    let (status, stderr) = common::run_broker_expect_exit(&[("JOIN_RATE_LIMIT_PER_MIN", "0")]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("JOIN_RATE_LIMIT_PER_MIN"), "{stderr}");
    let (status, stdout, _) = run_broker_capture(&["--check-config"], &[]);
    assert_eq!(status.code(), Some(0));
    assert!(
        stdout.lines().any(|l| l == "JOIN_RATE_LIMIT_PER_MIN=20"),
        "{stdout}"
    );
}
