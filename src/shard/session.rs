//! One WebSocket peer: the read loop (frames → messages → hello / send /
//! set_status), the writer task that drains the outbound queue one batch per
//! syscall, and the session's lifecycle in the routing table and Postgres.
use super::close::CloseReason;
use super::conn::ReadBuf;
use super::link::SessionLink;
use super::outbound::{FrameBatch, Stamp, StampKind};
use super::signal::yield_now;
use super::{Shard, ShardEvent};
use crate::db::DbCommand;
use crate::hook::Status;
use crate::mesh::directory::{Admission, MemberEntry, MeshEntry};
use crate::mesh::routes::{plan_broadcast, plan_direct};
use crate::mesh::Envelope;
use crate::metrics::RejectReason;
use crate::protocol::{
    self, ClientMessage, ErrorCode, Hello, ProtocolError, PushFields, Send, Target,
};
use crate::ws::{self, Incoming, MessageAssembler, OpCode};
use ed25519_dalek::{Signature, VerifyingKey};
use monoio::io::{AsyncWriteRent, Splitable};
use monoio::net::tcp::TcpOwnedWriteHalf;
use monoio::net::TcpStream;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Hello timestamps further than this from the broker's clock are stale.
const MAX_CLOCK_SKEW_MS: i64 = 60_000;
/// How long teardown waits for the writer to flush before shutting the socket.
const WRITER_FLUSH: Duration = Duration::from_secs(5);

/// A session after a successful hello.
struct Joined {
    mesh: Arc<MeshEntry>,
    member: Arc<MemberEntry>,
    presence_id: String,
    status: Status,
}

struct Session {
    shard: Rc<Shard>,
    link: Rc<SessionLink>,
    peer: SocketAddr,
    joined: Option<Joined>,
}

pub async fn run(
    shard: Rc<Shard>,
    stream: TcpStream,
    mut buf: ReadBuf,
    conn: u64,
    peer: SocketAddr,
) {
    let max_message = shard.ctx.config.max_message_bytes;
    let link = Rc::new(SessionLink::new(
        stream.as_raw_fd(),
        shard.ctx.config.max_outbound_bytes,
    ));
    shard.attach_session(conn, link.clone());
    shard.metrics.conn_opened();
    let (mut reader, writer) = stream.into_split();
    let writer = monoio::spawn(write_loop(writer, link.clone(), shard.clone()));
    let mut session = Session {
        shard: shard.clone(),
        link: link.clone(),
        peer,
        joined: None,
    };
    if shard.is_shutting_down() {
        link.close(CloseReason::Shutdown);
    }
    let mut assembler = MessageAssembler::new(max_message);
    let reason = 'session: loop {
        let mut consumed = 0;
        loop {
            let header = match ws::decode_client_frame(&mut buf.data[consumed..], max_message) {
                Ok(Some(header)) => header,
                Ok(None) => break,
                Err(e) => {
                    if matches!(e, ws::FrameError::TooLarge { .. }) {
                        let start =
                            oversized_start(&mut buf, consumed, &mut reader, &assembler).await;
                        session.answer_too_large(&start);
                    }
                    link.close(CloseReason::from_code(e.close_code()));
                    break 'session link.close_reason();
                }
            };
            let range = header.payload_range();
            let payload = &buf.data[consumed + range.start..consumed + range.end];
            consumed += range.end;
            link.heard(Instant::now());
            match assembler.push(&header, payload) {
                Ok(None) => {}
                Ok(Some(Incoming::Text(data) | Incoming::Binary(data))) => {
                    if link.close_reason().is_none() {
                        session.process_message(data).await;
                    }
                }
                Ok(Some(Incoming::Ping(data))) => link.send_control(OpCode::Pong, data),
                Ok(Some(Incoming::Pong(_))) => session.process_pong(),
                Ok(Some(Incoming::Close(code))) => {
                    link.peer_closed(code);
                    break 'session link.close_reason();
                }
                Err(e) => {
                    if e == ws::MessageError::TooLarge {
                        session.answer_too_large(assembler.refused_start());
                    }
                    link.close(CloseReason::from_code(e.close_code()));
                    break 'session link.close_reason();
                }
            }
        }
        buf.data.drain(..consumed);
        if !buf.fill(&mut reader).await {
            break link.close_reason().or(Some(CloseReason::PeerGone));
        }
    }
    .unwrap_or(CloseReason::PeerGone);
    session.teardown(reason);
    if reason == CloseReason::PeerGone {
        link.out.abort();
    } else if !link.out.is_closing() {
        link.close(reason);
    }
    if monoio::time::timeout(WRITER_FLUSH, writer).await.is_err() {
        link.shut();
    }
    shard.metrics.conn_closed(reason.as_str());
}

/// The start of the message whose frame at `buf.data[at..]` was refused
/// from its header alone as over MAX_MESSAGE_BYTES: reads on (for at most a
/// second) until the first 4 KiB of the message are buffered or the peer
/// stops, then gives what is there.
async fn oversized_start(
    buf: &mut ReadBuf,
    at: usize,
    reader: &mut impl monoio::io::AsyncReadRent,
    assembler: &MessageAssembler,
) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        // Taken before each read: a read cut off by the deadline takes the
        // buffer's bytes with it.
        let start = assembler.oversized_start(buf.data.get(at..).unwrap_or_default());
        let left = deadline.saturating_duration_since(Instant::now());
        if start.missing == 0 || left.is_zero() {
            return start.bytes;
        }
        if !matches!(
            monoio::time::timeout(left, buf.fill(reader)).await,
            Ok(true)
        ) {
            return start.bytes;
        }
    }
}

/// Drains the outbound queue: everything queued since the last write goes
/// out in one syscall. Ends after the close frame (or on abort).
async fn write_loop(mut writer: TcpOwnedWriteHalf, link: Rc<SessionLink>, shard: Rc<Shard>) {
    let mut batch = FrameBatch::default();
    while link.out.wait_ready().await {
        // Let every task already runnable this turn (readers routing more
        // sends) queue its frames first: one write then carries them all.
        yield_now().await;
        link.out.take_now(&mut batch);
        if batch.is_empty() {
            continue; // aborted meanwhile
        }
        // writev straight from the shared frames: no copy in user space.
        let mut result = Ok(());
        loop {
            let (written, returned) = writer.writev(batch).await;
            batch = returned;
            match written {
                Ok(0) => result = Err(()),
                Ok(n) if !batch.advance(n) => continue,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => result = Err(()),
            }
            break;
        }
        if result.is_err() {
            link.out.abort();
            link.shut();
            break;
        }
        shard.metrics.socket_write(batch.len());
        // Room freed: envelopes still held for this session's member (a
        // backlog bigger than one outbound bound) come next.
        if let Some((mesh, member)) = link.member_with_held() {
            shard.drain_held_to(&mesh, &member, &link);
        }
        let now = Instant::now();
        let mut histograms = shard.histograms.borrow_mut();
        for stamp in batch.drain_stamps() {
            record_stamp(&mut histograms, stamp, now);
        }
    }
    let _ = writer.shutdown().await;
}

fn record_stamp(histograms: &mut crate::metrics::LocalHistograms, stamp: Stamp, now: Instant) {
    let elapsed = now.duration_since(stamp.sent_at);
    match stamp.kind {
        StampKind::Ack => histograms.record_send_ack(stamp.priority, elapsed),
        StampKind::Push => histograms.record_send_push(stamp.priority, elapsed),
    }
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Session {
    async fn process_message(&mut self, data: &[u8]) {
        if let Some(hello) = self.process_parsed(data) {
            // Boxed: the hello path (signature, directory load) is big and
            // runs once; keeping it out of line keeps idle sessions small.
            Box::pin(self.process_hello(hello)).await;
        }
    }

    /// Parses and handles a message on the spot; only a hello, which may
    /// wait on a directory load, comes back (detached from the parse buffer)
    /// to be awaited.
    fn process_parsed(&mut self, data: &[u8]) -> Option<OwnedHello> {
        let read_at = Instant::now();
        self.shard.metrics.message_received();
        let shard = self.shard.clone();
        let mut parser = shard.parser.borrow_mut();
        let parsed = parser.parse(data);
        match parsed {
            Err(e)
                if self.joined.is_none()
                    && e.code == ErrorCode::InvalidField
                    && looks_like_hello(data) =>
            {
                // A malformed hello is still a refused hello.
                self.refuse_hello(e);
                None
            }
            Err(e) => {
                self.send_error(&e);
                None
            }
            Ok(ClientMessage::Hello(_)) if self.joined.is_some() => {
                self.send_error(&ProtocolError::new(
                    ErrorCode::AlreadyHello,
                    "this connection already said hello",
                ));
                None
            }
            Ok(ClientMessage::Hello(hello)) => Some(OwnedHello::from(hello)),
            Ok(ClientMessage::Send(send)) if self.joined.is_none() => {
                self.send_error(
                    &ProtocolError::new(ErrorCode::NoHello, "say hello first")
                        .with_id(Some(&send.id)),
                );
                None
            }
            Ok(ClientMessage::Send(send)) => {
                self.process_send(&send, read_at);
                None
            }
            Ok(ClientMessage::SetStatus(_)) if self.joined.is_none() => {
                self.send_error(&ProtocolError::new(ErrorCode::NoHello, "say hello first"));
                None
            }
            Ok(ClientMessage::SetStatus(status)) => {
                self.process_set_status(status);
                None
            }
        }
    }

    /// PROTOCOL.md §4: a message over MAX_MESSAGE_BYTES is answered with
    /// `error too_large`, echoing the `id` read from `start` (its first
    /// 4 KiB), just before the 1009 close.
    fn answer_too_large(&self, start: &[u8]) {
        if self.link.close_reason().is_none() {
            let error =
                ProtocolError::new(ErrorCode::TooLarge, "message exceeds MAX_MESSAGE_BYTES");
            self.send_error(&error.with_id(protocol::peek_id(start).as_deref()));
        }
    }

    fn send_error(&self, error: &ProtocolError) {
        self.shard.metrics.message_rejected(error.code.as_str());
        let mut json = Vec::with_capacity(96);
        protocol::write_error(&mut json, error.code, &error.message, error.id.as_deref());
        self.link
            .reply(ws::encode_server_frame(OpCode::Text, &json), None);
    }

    /// Every refused hello: the error, then close 1008.
    fn refuse_hello(&self, error: ProtocolError) {
        match error.code {
            ErrorCode::Capacity => self.shard.metrics.conn_rejected(RejectReason::Capacity),
            ErrorCode::Unauthorized | ErrorCode::BadSignature | ErrorCode::StaleTimestamp => {
                self.shard.metrics.conn_rejected(RejectReason::Unauthorized)
            }
            _ => {}
        }
        tracing::info!(target: "ws", peer = %self.peer, code = error.code.as_str(), "ws hello refused");
        self.send_error(&error);
        self.link.close(if error.code == ErrorCode::Unavailable {
            CloseReason::Internal
        } else {
            CloseReason::HelloRefused
        });
    }

    async fn process_hello(&mut self, hello: OwnedHello) {
        match self.admit(&hello).await {
            Ok(joined) => {
                let mut json = Vec::with_capacity(128);
                protocol::write_hello_ack(
                    &mut json,
                    &joined.presence_id,
                    &joined.mesh.id,
                    &joined.member.id,
                );
                self.link
                    .reply(ws::encode_server_frame(OpCode::Text, &json), None);
                tracing::info!(target: "ws", peer = %self.peer, shard = self.shard.index, mesh = %joined.mesh.id,
                    member = %joined.member.id, presence = %joined.presence_id, session = %hello.session_id, "ws hello");
                self.link.joined(&joined.mesh, &joined.member);
                self.shard
                    .drain_held_to(&joined.mesh, &joined.member, &self.link);
                self.joined = Some(joined);
            }
            Err(e) => self.refuse_hello(e),
        }
    }

    /// PROTOCOL.md §4 hello checks, then registration.
    async fn admit(&mut self, hello: &OwnedHello) -> Result<Joined, ProtocolError> {
        if (now_millis() - hello.timestamp).abs() > MAX_CLOCK_SKEW_MS {
            return Err(ProtocolError::new(
                ErrorCode::StaleTimestamp,
                "timestamp is more than 60 s from the broker's clock",
            ));
        }
        verify_signature(hello)?;
        let ctx = self.shard.ctx.clone();
        let unauthorized = || {
            ProtocolError::new(
                ErrorCode::Unauthorized,
                "not a current member of this mesh with this key",
            )
        };
        let (mesh, member) = loop {
            let mesh = ctx
                .directory_lookup(&hello.mesh_id, &hello.member_id, &hello.pubkey)
                .await
                .map_err(|_| {
                    ProtocolError::new(
                        ErrorCode::Unavailable,
                        "membership is unavailable (database down)",
                    )
                })?
                .ok_or_else(unauthorized)?;
            let member = mesh
                .view()
                .member(&hello.member_id)
                .filter(|m| m.pubkey.eq_ignore_ascii_case(&hello.pubkey))
                .cloned()
                .ok_or_else(unauthorized)?;
            match mesh.try_admit(ctx.config.max_connections_per_mesh) {
                Admission::Admitted => break (mesh, member),
                Admission::Full => {
                    return Err(ProtocolError::new(
                        ErrorCode::Capacity,
                        "mesh is at MAX_CONNECTIONS_PER_MESH",
                    ))
                }
                // Evicted while we looked: the next lookup loads it afresh.
                Admission::Evicted => continue,
            }
        };
        let presence_id = self.shard.ids.borrow_mut().next_id();
        self.shard
            .routes
            .borrow_mut()
            .add(&mesh, &member, self.link.clone());
        self.shard.to_db(DbCommand::PresenceOpen {
            id: presence_id.clone(),
            member_id: member.id.to_string(),
            session_id: hello.session_id.clone(),
            pid: hello.pid,
            cwd: hello.cwd.clone(),
            at: SystemTime::now(),
        });
        Ok(Joined {
            mesh,
            member,
            presence_id,
            status: Status::Idle,
        })
    }

    fn process_send(&self, send: &Send<'_>, read_at: Instant) {
        let joined = self.joined.as_ref().expect("send after hello");
        let (priority, id) = (send.priority, &*send.id);
        let view = joined.mesh.view();
        // Resolve a direct target before doing any work for the send.
        let direct = match &send.target {
            Target::Member(pubkey) => match view.member_by_pubkey(pubkey) {
                Some(member) => Some(member),
                None => {
                    return self.send_error(
                        &ProtocolError::new(
                            ErrorCode::UnknownTarget,
                            "targetSpec is not a current member of this mesh",
                        )
                        .with_id(Some(id)),
                    )
                }
            },
            Target::All => None,
            // The parser answers unsupported_target before a send gets here.
            Target::Unsupported => return,
        };
        let message_id = self.shard.ids.borrow_mut().next_id();
        let envelope = Arc::new(Envelope {
            frame: self.push_frame(send, &message_id),
            message_id: message_id.into_boxed_str(),
            priority,
            sent_at: read_at,
        });
        let planned = match direct {
            Some(member) => plan_direct(&envelope, &joined.mesh, member),
            None => plan_broadcast(&envelope, &joined.mesh, &joined.member),
        };
        let plan = match planned {
            Ok(plan) => plan,
            Err(_) => {
                return self.send_error(
                    &ProtocolError::new(ErrorCode::Unavailable, "a target's held queue is full")
                        .with_id(Some(id)),
                )
            }
        };
        self.shard.account_held(&joined.mesh, &plan.held);
        if let Some(route) = plan.route {
            let mut shards = plan.shards;
            while shards != 0 {
                let dest = shards.trailing_zeros() as usize;
                shards &= shards - 1;
                self.shard.send_to(dest, ShardEvent::Route(route.clone()));
            }
        }
        self.shard.metrics.message_routed(priority);
        let mut ack = Vec::with_capacity(96);
        protocol::write_ack(&mut ack, id, &envelope.message_id, None);
        let stamp = Stamp {
            sent_at: read_at,
            priority,
            kind: StampKind::Ack,
        };
        self.link
            .reply(ws::encode_server_frame(OpCode::Text, &ack), Some(stamp));
    }

    /// The push frame, serialized once straight into its WebSocket frame.
    fn push_frame(&self, send: &Send<'_>, message_id: &str) -> bytes::Bytes {
        let joined = self.joined.as_ref().expect("send after hello");
        let mut clock = self.shard.clock.borrow_mut();
        let mut frame = Vec::with_capacity(
            ws::SERVER_HEADER_ROOM + 200 + send.nonce.len() + send.ciphertext.len(),
        );
        frame.resize(ws::SERVER_HEADER_ROOM, 0);
        protocol::write_push(
            &mut frame,
            &PushFields {
                message_id,
                mesh_id: &joined.mesh.id,
                sender_pubkey: &joined.member.pubkey,
                priority: send.priority,
                nonce: &send.nonce,
                ciphertext: &send.ciphertext,
                created_at: clock.now_rfc3339(),
            },
        );
        ws::finish_server_frame(frame, OpCode::Text)
    }

    fn process_set_status(&mut self, status: Status) {
        if let Some(joined) = self.joined.as_mut() {
            joined.status = status;
            tracing::info!(target: "ws", presence = %joined.presence_id, status = status.as_str(), "ws set_status");
        }
    }

    fn process_pong(&self) {
        if let Some(joined) = &self.joined {
            self.shard.to_db(DbCommand::PresencePing {
                id: joined.presence_id.clone(),
                at: SystemTime::now(),
            });
        }
    }

    fn teardown(&mut self, reason: CloseReason) {
        let Some(joined) = self.joined.take() else {
            tracing::info!(target: "ws", peer = %self.peer, reason = reason.as_str(), "ws close");
            return;
        };
        self.shard
            .routes
            .borrow_mut()
            .remove(&joined.mesh, &joined.member, &self.link);
        joined.mesh.release();
        // Cut off (its own answers overflowed the queue) with pushes still
        // queued: the member keeps them unless another of its sessions,
        // which got the same pushes, is still live.
        let orphans = self.link.take_orphans();
        if !orphans.is_empty() && joined.member.live_shards.get() == 0 {
            let count = orphans.len() as i64;
            joined.member.held.push_front(orphans);
            self.shard.ctx.metrics.global().queue_depth_add(count);
        }
        self.shard.to_db(DbCommand::PresenceClose {
            id: joined.presence_id.clone(),
            member_id: joined.member.id.to_string(),
            at: SystemTime::now(),
        });
        // Envelopes that raced in for this member go to a session elsewhere.
        if !joined.member.held.is_empty() {
            self.shard.request_drain(
                &joined.mesh,
                &joined.member,
                joined.member.live_shards.get(),
            );
        }
        tracing::info!(target: "ws", peer = %self.peer, mesh = %joined.mesh.id, member = %joined.member.id,
            presence = %joined.presence_id, reason = reason.as_str(), code = reason.code(), "ws close");
    }
}

fn verify_signature(hello: &OwnedHello) -> Result<(), ProtocolError> {
    let bad = || {
        ProtocolError::new(
            ErrorCode::BadSignature,
            "signature does not verify for this pubkey",
        )
    };
    let mut key = [0u8; 32];
    let mut sig = [0u8; 64];
    decode_hex(&hello.pubkey, &mut key).ok_or_else(bad)?;
    decode_hex(&hello.signature, &mut sig).ok_or_else(bad)?;
    let key = VerifyingKey::from_bytes(&key).map_err(|_| bad())?;
    let signed = format!(
        "{}|{}|{}|{}",
        hello.mesh_id, hello.member_id, hello.pubkey, hello.timestamp
    );
    key.verify_strict(signed.as_bytes(), &Signature::from_bytes(&sig))
        .map_err(|_| bad())
}

fn decode_hex(hex: &str, out: &mut [u8]) -> Option<()> {
    if hex.len() != out.len() * 2 {
        return None;
    }
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(())
}

/// A refused hello must close 1008 even when a field is malformed.
fn looks_like_hello(data: &[u8]) -> bool {
    let mut copy = data.to_vec();
    simd_json::to_borrowed_value(&mut copy)
        .ok()
        .and_then(|v| {
            use simd_json::prelude::*;
            v.get_str("type").map(|t| t == "hello")
        })
        .unwrap_or(false)
}

/// A hello detached from the scratch buffer, so the session can await a
/// directory load without holding a borrow of it.
struct OwnedHello {
    mesh_id: String,
    member_id: String,
    pubkey: String,
    session_id: String,
    pid: i32,
    cwd: String,
    timestamp: i64,
    signature: String,
}

impl From<Hello<'_>> for OwnedHello {
    fn from(hello: Hello<'_>) -> Self {
        OwnedHello {
            mesh_id: hello.mesh_id.into_owned(),
            member_id: hello.member_id.into_owned(),
            pubkey: hello.pubkey.into_owned(),
            session_id: hello.session_id.into_owned(),
            pid: hello.pid,
            cwd: hello.cwd.into_owned(),
            timestamp: hello.timestamp,
            signature: hello.signature.into_owned(),
        }
    }
}
