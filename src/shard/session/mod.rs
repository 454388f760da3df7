//! One WebSocket peer: the read loop (frames → messages → hello / send /
//! set_status) and the session's lifecycle in the routing table and Postgres.
//!
//! - `writer` — the task that drains the outbound queue, one batch per syscall.
//! - `hello`  — the signed hello's checks and the session's admission.
//! - `send`   — a send: its envelope, its plan, its ack.
//! - `admin`  — an admin's kick, ban, unban, bans and audit reads.
mod admin;
mod hello;
mod send;
mod writer;

use super::link::SessionLink;
use super::readbuf::ReadBuf;
use super::state::Shard;
use crate::audit::AuditEvent;
use crate::db::DbCommand;
use crate::hook::Status;
use crate::mesh::directory::{MemberEntry, MeshEntry};
use crate::mesh::peers::{self, Departure, Holder, MemberSessions, PeerEvent, SessionEntry};
use crate::protocol::CloseReason;
use crate::protocol::{self, ClientMessage, ErrorCode, ProtocolError};
use crate::status::Source;
use crate::ws::{self, Incoming, MessageAssembler, OpCode};
use admin::OwnedAdmin;
use hello::{looks_like_hello, OwnedHello};
use monoio::io::Splitable;
use monoio::net::TcpStream;
use std::cell::Cell;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How long teardown waits for the writer to flush before shutting the socket.
const WRITER_FLUSH: Duration = Duration::from_secs(5);

/// A message whose handling awaits something (see `process_parsed`).
enum Deferred {
    Hello(OwnedHello),
    Admin(OwnedAdmin, Option<String>),
}

/// A session after a successful hello.
struct Joined {
    mesh: Arc<MeshEntry>,
    member: Arc<MemberEntry>,
    /// The session it holds: its presence, shared with the directory.
    entry: Arc<SessionEntry>,
    cwd: String,
}

struct Session {
    shard: Rc<Shard>,
    link: Rc<SessionLink>,
    conn: u64,
    peer: SocketAddr,
    joined: Option<Joined>,
    /// Sends refused `rate_limited` since the last one accepted.
    rate_refusals: Cell<u32>,
}

pub async fn run(
    shard: Rc<Shard>,
    stream: TcpStream,
    mut buf: ReadBuf,
    conn: u64,
    peer: SocketAddr,
    hello_by: Instant,
) {
    let max_message = shard.ctx.config.max_message_bytes;
    let link = Rc::new(SessionLink::new(
        stream.as_raw_fd(),
        conn,
        shard.ctx.config.max_outbound_bytes,
        hello_by,
    ));
    shard.attach_session(conn, link.clone());
    shard.metrics.conn_opened();
    let (mut reader, writer) = stream.into_split();
    let writer = monoio::spawn(writer::write_loop(writer, link.clone(), shard.clone()));
    let mut session = Session {
        shard: shard.clone(),
        link: link.clone(),
        conn,
        peer,
        joined: None,
        rate_refusals: Cell::new(0),
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
                        // Boxed: a rare path, kept out of every idle
                        // session's resident future.
                        let start =
                            Box::pin(oversized_start(&mut buf, consumed, &mut reader, &assembler))
                                .await;
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
    if reason == CloseReason::PeerGone {
        // Before the teardown, so what was never written goes back with it.
        link.abort(Vec::new());
    }
    session.teardown(reason);
    if reason != CloseReason::PeerGone && !link.out.is_closing() {
        link.close(reason);
    }
    // Boxed like the other one-off awaits: the timer would otherwise sit in
    // every idle session's future.
    if Box::pin(monoio::time::timeout(WRITER_FLUSH, writer))
        .await
        .is_err()
    {
        link.shut();
    }
    shard.metrics.conn_closed(reason);
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

impl Session {
    /// PROTOCOL.md §4: a message over MAX_MESSAGE_BYTES is answered with
    /// `error too_large`, echoing the `id` and `_reqId` read from `start`
    /// (its first 4 KiB), just before the 1009 close.
    fn answer_too_large(&self, start: &[u8]) {
        if self.link.close_reason().is_none() {
            let ids = protocol::peek_ids(start);
            let error =
                ProtocolError::new(ErrorCode::TooLarge, "message exceeds MAX_MESSAGE_BYTES")
                    .with_id(ids.id.as_deref())
                    .with_req_id(ids.req_id.as_deref());
            self.reject(&error);
        }
    }

    async fn process_message(&mut self, data: &[u8]) {
        // Boxed: the hello and admin paths (signature, directory load, a
        // db round trip) are big and rare; keeping them out of line keeps
        // idle sessions small.
        match self.process_parsed(data) {
            Some(Deferred::Hello(hello)) => Box::pin(self.process_hello(hello)).await,
            Some(Deferred::Admin(admin, req_id)) => {
                Box::pin(self.process_admin(admin, req_id)).await
            }
            None => {}
        }
    }

    /// Parses and handles a message on the spot; only a hello, which may
    /// wait on a directory load, and an admin message, which may wait on
    /// Postgres, come back (detached from the parse buffer) to be awaited.
    fn process_parsed(&mut self, data: &[u8]) -> Option<Deferred> {
        let read_at = Instant::now();
        self.shard.metrics.message_received();
        let shard = self.shard.clone();
        let mut parser = shard.parser.borrow_mut();
        let parsed = match parser.parse(data) {
            Ok(parsed) => parsed,
            Err(e) => {
                if self.joined.is_none()
                    && matches!(
                        e.code,
                        ErrorCode::InvalidField | ErrorCode::UnsupportedProtocol
                    )
                    && looks_like_hello(data)
                {
                    // A malformed hello is still a refused hello.
                    self.refuse_hello(e);
                } else {
                    self.reject(&e);
                }
                return None;
            }
        };
        let req_id = parsed.req_id.as_deref();
        let no_hello = |id: Option<&str>| {
            ProtocolError::new(ErrorCode::NoHello, "say hello first")
                .with_id(id)
                .with_req_id(req_id)
        };
        match parsed.message {
            ClientMessage::Hello(_) | ClientMessage::SessionHello(_) if self.joined.is_some() => {
                self.reject(
                    &ProtocolError::new(
                        ErrorCode::AlreadyHello,
                        "this connection already said hello",
                    )
                    .with_req_id(req_id),
                );
                None
            }
            ClientMessage::Hello(hello) => Some(Deferred::Hello(OwnedHello::new(hello, req_id))),
            ClientMessage::SessionHello(hello) => {
                Some(Deferred::Hello(OwnedHello::from_session(hello, req_id)))
            }
            ClientMessage::Send(send) if self.joined.is_none() => {
                self.send_error(&no_hello(Some(&send.id)));
                None
            }
            _ if self.joined.is_none() => {
                self.send_error(&no_hello(None));
                None
            }
            ClientMessage::Send(send) => {
                self.process_send(&send, req_id, read_at);
                None
            }
            ClientMessage::SetStatus(status) => {
                self.process_set_status(status);
                None
            }
            ClientMessage::ListPeers => {
                self.process_list_peers(req_id);
                None
            }
            ClientMessage::SetSummary(summary) => {
                self.process_set_summary(summary.as_deref());
                None
            }
            ClientMessage::JoinGroup(join) => {
                let joined = self.joined.as_ref().expect("joined");
                let result = shard.join_group(
                    &joined.mesh,
                    &joined.member,
                    join.name,
                    join.role.as_deref(),
                );
                if result.is_err() {
                    self.reject(
                        &ProtocolError::invalid_field(
                            "name",
                            "would make more than 64 groups for this member",
                        )
                        .with_req_id(req_id),
                    );
                }
                None
            }
            ClientMessage::LeaveGroup { name } => {
                let joined = self.joined.as_ref().expect("joined");
                shard.leave_group(&joined.mesh, &joined.member, &name);
                None
            }
            ClientMessage::Admin(admin) => Some(Deferred::Admin(
                OwnedAdmin::new(admin),
                req_id.map(str::to_owned),
            )),
            // No reply (PROTOCOL.md §11).
            ClientMessage::ClientAck(ids) => {
                let joined = self.joined.as_ref().expect("joined");
                shard.client_ack(&self.link, &joined.mesh, &joined.member, &ids);
                None
            }
        }
    }

    /// Answers a message with `error`; once the session has joined, the
    /// refusal is audited too (`rejected`). Before the hello no mesh is
    /// known: a refused hello is audited by `process_hello`.
    fn reject(&self, error: &ProtocolError) {
        if let Some(joined) = &self.joined {
            self.shard
                .audit(AuditEvent::rejected(&joined.mesh, &joined.member, error));
        }
        self.send_error(error);
    }

    fn send_error(&self, error: &ProtocolError) {
        self.shard.metrics.message_rejected(error.code.as_str());
        let mut json = Vec::with_capacity(96);
        protocol::write_error(
            &mut json,
            error.code,
            &error.message,
            error.id.as_deref(),
            error.req_id.as_deref(),
        );
        self.link
            .reply(ws::encode_server_frame(OpCode::Text, &json), None);
    }

    fn process_set_status(&mut self, status: Status) {
        if let Some(joined) = &self.joined {
            tracing::info!(target: "ws", presence = %joined.entry.presence_id, status = status.as_str(), "ws set_status");
            self.shard.write_status(&self.link, status, Source::Manual);
        }
    }

    /// PROTOCOL.md §9 list_peers: the mesh's board, read on this shard.
    /// A list larger than what the session's outbound queue has room for
    /// goes out when nothing else is queued (a mesh of 10,000 sessions
    /// lists about 4 MB); otherwise it is refused for now rather than
    /// cutting the session off.
    fn process_list_peers(&self, req_id: Option<&str>) {
        let joined = self.joined.as_ref().expect("joined");
        self.shard.metrics.peers_listed();
        let mut json = Vec::with_capacity(4096);
        peers::write_peers_list(
            &mut json,
            &joined.mesh.board,
            &joined.mesh.remote,
            &joined.entry,
            req_id,
        );
        let frame = ws::encode_server_frame(OpCode::Text, &json);
        if self.link.out.push_large(frame).is_err() {
            self.reject(
                &ProtocolError::new(
                    ErrorCode::Unavailable,
                    "the peer list does not fit the outbound queue now; ask again",
                )
                .with_req_id(req_id),
            );
        }
    }

    fn process_set_summary(&self, summary: Option<&str>) {
        let joined = self.joined.as_ref().expect("joined");
        if joined.entry.set_summary(summary.map(Into::into)) {
            self.shard
                .announce(&joined.mesh, &joined.entry, PeerEvent::Summary);
        }
    }

    fn process_pong(&self) {
        if let Some(joined) = &self.joined {
            self.shard.to_db(DbCommand::PresencePing {
                id: joined.entry.presence_id.to_string(),
                at: SystemTime::now(),
            });
            let window = self.shard.ctx.config.hook_fresh_window;
            if self.link.status().inference_allowed(Instant::now(), window) {
                self.shard.request_inference(self.conn, &joined.cwd);
            }
        }
    }

    fn teardown(&mut self, reason: CloseReason) {
        let Some(joined) = self.joined.take() else {
            tracing::info!(target: "ws", peer = %self.peer, reason = reason.as_str(), "ws close");
            return;
        };
        let shard = self.shard.clone();
        let entry = &joined.entry;
        shard.ctx.hooks.remove(&joined.cwd, shard.index, self.conn);
        // A lost socket leaves the session away in its grace (PROTOCOL.md
        // §9); a close frame, a revocation or the broker's shutdown ends it.
        let keep = reason.is_lost()
            && !shard.ctx.config.session_grace.is_zero()
            && !shard.is_shutting_down();
        let holder = Holder::Live {
            shard: shard.index,
            conn: self.conn,
        };
        let departure = MemberSessions::depart(entry, holder, keep);
        // Cut off (its own answers overflowed the queue) with pushes still
        // queued: the member keeps what no other session of it may take.
        let left = shard.routes.borrow_mut().leave(
            &joined.mesh,
            &joined.member,
            &self.link,
            self.link.take_orphans(),
        );
        shard.store_late(left.late);
        shard.cluster_changed(&joined.mesh);
        // Its leases lapse now: a session in grace cannot ack (§11).
        shard.release_leases(&self.link, &joined.mesh, &joined.member);
        if self.link.is_leasing() {
            joined.mesh.leasing.remove();
            joined.member.leasing.remove();
        }
        match departure {
            Departure::Ended => shard.end_session(&joined.mesh, entry),
            Departure::Away { spell } => shard.start_grace(&joined.mesh, entry, spell),
            Departure::TakenOver => shard.board_release(&joined.mesh, entry),
        }
        shard.audit(AuditEvent::disconnect(
            &joined.mesh,
            &joined.member,
            &entry.presence_id,
            reason,
        ));
        // Envelopes that raced in for this member go to a session elsewhere.
        shard.request_drain(&joined.mesh, &joined.member, left.drain);
        for entry in &left.sessions {
            shard.request_session_drain(&joined.mesh, entry);
        }
        tracing::info!(target: "ws", peer = %self.peer, mesh = %joined.mesh.id, member = %joined.member.id,
            presence = %entry.presence_id, reason = reason.as_str(), code = reason.code(),
            away = matches!(departure, Departure::Away { .. }), "ws close");
    }
}
