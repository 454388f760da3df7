//! Criterion micro-benchmarks of the hot pieces: WebSocket frame decode and
//! encode, protocol parse and push serialization, routing one envelope
//! to 1 / 100 / 10,000 local recipient sessions, and the peer directory
//! (publishing a shard's part, writing `peers_list`) at 1,000 and 10,000
//! sessions per mesh.
//!
//! `cargo bench --bench micro` (results under target/criterion).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use meshbroker::mesh::deliver::LocalRoutes;
use meshbroker::mesh::directory::{Directory, MemberRow, MeshEntry};
use meshbroker::mesh::held::HeldBudget;
use meshbroker::mesh::peers::{self, Holder, MemberSessions, NewSession, SessionEntry};
use meshbroker::mesh::plan::{plan_many, Audience, HoldLimits};
use meshbroker::mesh::{Envelope, EnvelopeTarget};
use meshbroker::protocol::{self, PushFields};
use meshbroker::shard::link::SessionLink;
use meshbroker::shard::outbound::FrameBatch;
use meshbroker::status::StatusState;
use meshbroker::ws::{self, OpCode};
use std::hint::black_box;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

const CIPHERTEXT_BYTES: usize = 256;

fn send_json() -> String {
    format!(
        r#"{{"type":"send","targetSpec":"*","priority":"now","nonce":"bm9uY2Vub25jZW5vbmNl","ciphertext":"{}","id":"c-1"}}"#,
        "A".repeat(CIPHERTEXT_BYTES)
    )
}

fn frames(c: &mut Criterion) {
    let json = send_json();
    let frame = ws::encode_client_frame(OpCode::Text, json.as_bytes(), [1, 2, 3, 4], true);
    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Bytes(frame.len() as u64));
    group.bench_function("decode_client_300B", |b| {
        let mut buf = frame.clone();
        b.iter(|| {
            buf.copy_from_slice(&frame);
            black_box(ws::decode_client_frame(&mut buf, 65536).unwrap())
        })
    });
    group.bench_function("encode_server_300B", |b| {
        b.iter(|| black_box(ws::encode_server_frame(OpCode::Text, json.as_bytes())))
    });
    group.finish();
}

fn protocol_messages(c: &mut Criterion) {
    let json = send_json();
    let mut group = c.benchmark_group("protocol");
    group.bench_function("parse_send", |b| {
        let mut parser = protocol::Parser::default();
        b.iter(|| {
            let parsed = parser.parse(json.as_bytes()).unwrap();
            black_box(&parsed);
        })
    });
    group.bench_function("parse_send_tree", |b| {
        let mut buffers = simd_json::Buffers::default();
        let mut scratch = Vec::new();
        b.iter(|| {
            scratch.clear();
            scratch.extend_from_slice(json.as_bytes());
            let parsed = protocol::parse_client_message(&mut scratch, &mut buffers).unwrap();
            black_box(&parsed);
        })
    });
    let ciphertext = "A".repeat(CIPHERTEXT_BYTES);
    group.bench_function("write_push", |b| {
        let mut out = Vec::with_capacity(1024);
        b.iter(|| {
            out.clear();
            protocol::write_push(
                &mut out,
                &PushFields {
                    message_id: "01jdq7x3c4m5n6p7q8r9",
                    mesh_id: "mesh-1",
                    sender_pubkey:
                        "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90",
                    sender_member_pubkey:
                        "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90",
                    target_spec: None,
                    priority: protocol::Priority::Now,
                    client_message_id: None,
                    nonce: "bm9uY2Vub25jZW5vbmNl",
                    ciphertext: &ciphertext,
                    created_at: "2026-11-27T03:14:24.000Z",
                },
            );
            black_box(&out);
        })
    });
    group.finish();
}

/// Plan and deliver one broadcast to `n` members, each with one local
/// session whose outbound queue takes the shared frame.
fn routing(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_broadcast");
    for n in [1usize, 100, 10_000] {
        let rows: Vec<MemberRow> = (0..=n)
            .map(|i| MemberRow {
                id: format!("m{i}"),
                peer_pubkey: format!("{i:064x}"),
                revoked: false,
                ..MemberRow::default()
            })
            .collect();
        let mesh = Directory::default().install("bench", &rows);
        let view = mesh.view();
        let members = view.members();
        let sender = members[0].clone();
        let mut routes = LocalRoutes::new(0);
        let sessions: Vec<Rc<SessionLink>> = members[1..]
            .iter()
            .map(|member| {
                let session = Rc::new(SessionLink::new(-1, 0, usize::MAX, Instant::now()));
                routes.add(&mesh, member, session.clone());
                session
            })
            .collect();
        let frame = ws::encode_server_frame(OpCode::Text, send_json().as_bytes());
        group.throughput(Throughput::Elements(n as u64));
        let mut batch = FrameBatch::default();
        let budget = HeldBudget::new(usize::MAX / 2);
        let limits = HoldLimits {
            max_per_member: usize::MAX,
            max_bytes_per_member: usize::MAX,
            budget: &budget,
        };
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let envelope = Arc::new(Envelope {
                    message_id: "m".into(),
                    mesh: mesh.clone(),
                    sender: sender.clone(),
                    target: EnvelopeTarget::Many("*".into()),
                    priority: protocol::Priority::Now,
                    created_at: SystemTime::now(),
                    expires_at: SystemTime::now(),
                    frame: frame.clone(),
                    nonce: 0..0,
                    ciphertext: 0..0,
                    sent_at: Instant::now(),
                    restored: false,
                    holds_in_flight: Default::default(),
                    redelivered_frame: Default::default(),
                    client_message_id: None,
                    session: None,
                });
                let plan = plan_many(&envelope, Audience::All, &limits).unwrap();
                let done = routes.deliver_route(plan.route.as_ref().unwrap());
                // Empty the queues as each writer would, keeping memory flat.
                for session in &sessions {
                    drain(session, &mut batch);
                }
                black_box(done.pushes)
            })
        });
    }
    group.finish();
}

/// What a connection's writer does first: take every queued frame.
fn drain(session: &SessionLink, batch: &mut FrameBatch) {
    session.out.take_now(batch);
    batch.finish(drop, false, |_, _| {});
}

/// A mesh of `n` members with one session each, half listed by each of two
/// shards (published), and one of the sessions.
fn directory_of(n: usize) -> (Arc<MeshEntry>, Vec<Arc<SessionEntry>>) {
    let rows: Vec<MemberRow> = (0..n)
        .map(|i| MemberRow {
            id: format!("member-{i:05}"),
            peer_pubkey: format!("{i:064x}"),
            display_name: format!("peer {i}"),
            groups: vec![("eng/backend".into(), Some("dev".into()))],
            ..MemberRow::default()
        })
        .collect();
    let mesh = Directory::default().install("mesh-bench", &rows);
    let view = mesh.view();
    let sessions: Vec<Arc<SessionEntry>> = view
        .members()
        .iter()
        .enumerate()
        .map(|(i, member)| {
            let holder = Holder::Live {
                shard: i % 2,
                conn: i as u64,
            };
            let claim = MemberSessions::claim(member, "session-1", None, holder, || {
                Ok::<_, ()>(NewSession {
                    summary: None,
                    presence_id: format!("presence-{i:05}").into(),
                    session_pubkey: None,
                    pid: 4000 + i as i32,
                    cwd: "/home/dev/projects/meshbroker".into(),
                    connected_at: "2026-12-02T03:00:00.000Z".into(),
                    display_name: member.display_name().as_ref().as_ref().into(),
                    status: StatusState::new(Instant::now()),
                })
            });
            claim.unwrap().entry().clone()
        })
        .collect();
    for shard in 0..2 {
        let part = sessions.iter().skip(shard).step_by(2).cloned().collect();
        mesh.board.publish(shard, part);
    }
    (mesh, sessions)
}

fn directory(c: &mut Criterion) {
    let mut group = c.benchmark_group("directory");
    for n in [1_000usize, 10_000] {
        let (mesh, sessions) = directory_of(n);
        let part: Vec<Arc<SessionEntry>> = sessions.iter().step_by(2).cloned().collect();
        group.bench_with_input(BenchmarkId::new("publish_half", n), &n, |b, _| {
            b.iter(|| mesh.board.publish(0, part.clone()))
        });
        let mut out = Vec::new();
        peers::write_peers_list(&mut out, &mesh.board, &mesh.remote, &sessions[0], Some("r"));
        group.throughput(Throughput::Bytes(out.len() as u64));
        group.bench_with_input(BenchmarkId::new("peers_list", n), &n, |b, _| {
            b.iter(|| {
                out.clear();
                peers::write_peers_list(
                    &mut out,
                    &mesh.board,
                    &mesh.remote,
                    &sessions[0],
                    Some("r"),
                );
                black_box(out.len())
            })
        });
        eprintln!("directory: {n} sessions, peers_list {} bytes", out.len());
    }
    group.finish();
}

criterion_group!(benches, frames, protocol_messages, routing, directory);
criterion_main!(benches);
