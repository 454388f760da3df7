//! Criterion micro-benchmarks of the hot pieces: WebSocket frame decode and
//! encode, protocol parse and push serialization, and routing one envelope
//! to 1 / 100 / 10,000 local recipient sessions.
//!
//! `cargo bench --bench micro` (results under target/criterion).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use meshbroker::mesh::deliver::LocalRoutes;
use meshbroker::mesh::directory::{Directory, MemberRow};
use meshbroker::mesh::held::HeldBudget;
use meshbroker::mesh::plan::{plan_broadcast, HoldLimits};
use meshbroker::mesh::{Envelope, EnvelopeTarget};
use meshbroker::protocol::{self, PushFields};
use meshbroker::shard::link::SessionLink;
use meshbroker::shard::outbound::FrameBatch;
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
                    priority: protocol::Priority::Now,
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
                let session = Rc::new(SessionLink::new(-1, usize::MAX));
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
            budget: &budget,
        };
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let envelope = Arc::new(Envelope {
                    message_id: "m".into(),
                    mesh: mesh.clone(),
                    sender: sender.clone(),
                    target: EnvelopeTarget::All,
                    priority: protocol::Priority::Now,
                    created_at: SystemTime::now(),
                    expires_at: SystemTime::now(),
                    frame: frame.clone(),
                    nonce: 0..0,
                    ciphertext: 0..0,
                    sent_at: Instant::now(),
                    restored: false,
                    holds_in_flight: Default::default(),
                });
                let plan = plan_broadcast(&envelope, &limits).unwrap();
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
    batch.finish(drop, drop);
}

criterion_group!(benches, frames, protocol_messages, routing);
criterion_main!(benches);
