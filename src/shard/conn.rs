//! HTTP/1.1 on an accepted socket: keep-alive request loop, the routes,
//! and the hand-off of `/ws` upgrades to a WebSocket session.
use super::readbuf::ReadBuf;
use super::session;
use super::state::Shard;
use crate::audit::AuditEvent;
use crate::cluster::{BusCommand, Cluster};
use crate::db::join::JoinFailed;
use crate::db::{DbCommand, PendingStatus};
use crate::hook::{self, HookSignal};
use crate::http::{
    self, error_code_json, error_json, parse_head, preflight, Method, RequestHead, Response,
};
use crate::inbox::ShardEvent;
use crate::join::{self, JoinError, JoinRequest};
use crate::metrics::HttpTimeout;
use crate::status::hook_index::{HookRank, HookTarget};
use crate::ws;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Instant, SystemTime};

/// What a request turns into.
enum Outcome {
    Respond(Response),
    Upgrade {
        key: String,
    },
    /// A valid hook signal, within its rate: applied to its session, which
    /// may live on another shard, so it is answered asynchronously.
    Hook(HookSignal),
    /// A join whose fields and signature are valid: the db thread decides
    /// the rest, so it is answered asynchronously too.
    Join(Box<JoinRequest>),
}

pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream, peer: SocketAddr) {
    // From accept: the first request and, on /ws, the hello after it must
    // come within HELLO_TIMEOUT_SECONDS, so a socket that says nothing (or
    // trickles) cannot hold a descriptor forever.
    let hello_by = Instant::now() + shard.ctx.config.hello_timeout;
    let _ = stream.set_nodelay(true);
    let conn = shard.register_conn(stream.as_raw_fd());
    // Two phases in sequence, so a WebSocket's long-lived state does not
    // carry the HTTP phase's locals (the future is as big as its largest
    // phase, and 100k idle sessions multiply it): the HTTP phase is boxed
    // and freed before the session starts.
    let upgraded = Box::pin(serve_http(&shard, &mut stream, peer.ip(), hello_by)).await;
    if let Some(buf) = upgraded {
        session::run(shard.clone(), stream, buf, conn, peer, hello_by).await;
    }
    shard.unregister_conn(conn);
}

/// The HTTP/1.1 keep-alive loop. Returns the read buffer (with any bytes
/// already received after the handshake) once a request was upgraded.
async fn serve_http(
    shard: &Rc<Shard>,
    stream: &mut TcpStream,
    client: IpAddr,
    hello_by: Instant,
) -> Option<ReadBuf> {
    let mut buf = ReadBuf::default();
    // Each request (head and body) must be in before its deadline: the
    // first by `hello_by`, each later one within HTTP_IDLE_TIMEOUT_SECONDS
    // of the answer before it.
    let mut deadline = (hello_by, HttpTimeout::Hello);
    loop {
        // What was read before this request's first byte (some of which
        // may already be buffered, pipelined behind the last one).
        let begun_after = buf.received - buf.data.len() as u64;
        let head = match before(deadline.0, read_head(stream, &mut buf)).await {
            None => {
                let begun = buf.received > begun_after;
                return timed_out(shard, stream, begun, deadline.1).await;
            }
            Some(Ok(Some(head))) => head,
            Some(Ok(None)) => break,
            Some(Err(status)) => {
                let response = error_json(status, http::reason_phrase(status));
                let _ = stream.write_all(response.to_bytes(false)).await;
                break;
            }
        };
        let started = Instant::now();
        let body_len = head.content_length.unwrap_or(0);
        if head.chunked {
            let response = error_json(
                411,
                "chunked request bodies are not supported; send Content-Length",
            );
            let _ = stream.write_all(response.to_bytes(false)).await;
            break;
        }
        // PROTOCOL.md §12: every /join request takes a token, whatever
        // becomes of it, before anything else is looked at. A refused one
        // is answered at once and its connection closed (its body unread).
        let is_join = head.path == "/join" && head.method != Method::Options;
        if is_join && !join_allowed(shard, client) {
            tracing::debug!(target: "join", client = %client, "join rate limited");
            let response = join_refusal(&JoinError::RateLimited);
            let _ = stream.write_all(response.to_bytes(false)).await;
            break;
        }
        if body_len > shard.ctx.config.max_message_bytes {
            let response = if is_join {
                join_refusal(&JoinError::TooLarge)
            } else {
                error_json(413, "request body exceeds MAX_MESSAGE_BYTES")
            };
            let _ = stream.write_all(response.to_bytes(false)).await;
            break;
        }
        if head.expect_continue && body_len > 0 && buf.data.len() < head.head_len + body_len {
            let continue_line = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
            if stream.write_all(continue_line).await.0.is_err() {
                break;
            }
        }
        match before(
            deadline.0,
            read_exact_len(stream, &mut buf, head.head_len + body_len),
        )
        .await
        {
            None => return timed_out(shard, stream, true, deadline.1).await,
            Some(false) => break,
            Some(true) => {}
        }
        let keep_alive = head.keep_alive && !shard.is_shutting_down();
        let mut body = buf.data[head.head_len..head.head_len + body_len].to_vec();
        buf.data.drain(..head.head_len + body_len);
        let outcome = match route(shard, &head, &mut body) {
            Outcome::Hook(signal) => Outcome::Respond(apply_hook(shard, signal).await),
            Outcome::Join(request) => Outcome::Respond(apply_join(shard, *request).await),
            other => other,
        };
        match outcome {
            Outcome::Upgrade { key } => {
                let (res, _) = stream
                    .write_all(ws::switching_protocols_response(&key))
                    .await;
                shard.histograms.borrow_mut().record_http(started.elapsed());
                return res.is_ok().then_some(buf);
            }
            Outcome::Hook(_) | Outcome::Join(_) => {
                unreachable!("hook signals and joins are applied above")
            }
            Outcome::Respond(response) => {
                let bytes = if head.method == Method::Head {
                    response.to_head_bytes(keep_alive)
                } else {
                    response.to_bytes(keep_alive)
                };
                let (res, _) = stream.write_all(bytes).await;
                shard.histograms.borrow_mut().record_http(started.elapsed());
                if res.is_err() || !keep_alive {
                    break;
                }
                let idle = shard.ctx.config.http_idle_timeout;
                deadline = (Instant::now() + idle, HttpTimeout::Idle);
            }
        }
    }
    None
}

/// `fut`'s output, or None once `deadline` has passed.
async fn before<T>(deadline: Instant, fut: impl std::future::Future<Output = T>) -> Option<T> {
    let left = deadline.saturating_duration_since(Instant::now());
    monoio::time::timeout(left, fut).await.ok()
}

/// A request did not arrive whole in time: a partial one is answered 408
/// (RFC 9110 §15.5.9), a connection that sent nothing is just closed.
async fn timed_out(
    shard: &Shard,
    stream: &mut TcpStream,
    begun: bool,
    limit: HttpTimeout,
) -> Option<ReadBuf> {
    shard.metrics.http_timed_out(limit);
    tracing::debug!(target: "http", limit = limit.as_str(), partial = begun, "http timeout");
    if begun {
        let response = error_json(408, "request timeout");
        let _ = stream.write_all(response.to_bytes(false)).await;
    }
    None
}

/// Reads until a whole request head is buffered. Ok(None): the peer closed
/// (or the shard shut the socket) between requests. Err: the status to answer.
async fn read_head(stream: &mut TcpStream, buf: &mut ReadBuf) -> Result<Option<RequestHead>, u16> {
    loop {
        if !buf.data.is_empty() {
            match parse_head(&buf.data) {
                Ok(Some(head)) => return Ok(Some(head)),
                Ok(None) => {}
                Err(e) => return Err(e.status()),
            }
        }
        if !buf.fill(stream).await {
            return Ok(None);
        }
    }
}

async fn read_exact_len(stream: &mut TcpStream, buf: &mut ReadBuf, len: usize) -> bool {
    while buf.data.len() < len {
        if !buf.fill(stream).await {
            return false;
        }
    }
    true
}

fn route(shard: &Shard, head: &RequestHead, body: &mut [u8]) -> Outcome {
    if head.method == Method::Options {
        return Outcome::Respond(preflight());
    }
    let wants_upgrade = head.upgrade_websocket || head.ws_key.is_some();
    let response = match (head.path.as_str(), head.method) {
        ("/ws", _) => return websocket_upgrade(head),
        (_, _) if wants_upgrade => error_json(404, "WebSocket upgrades are served on /ws only"),
        ("/health", Method::Get | Method::Head) => health(shard),
        ("/health/live", Method::Get | Method::Head) => live(shard),
        ("/metrics", Method::Get | Method::Head) => metrics(shard),
        ("/hook/set-status", Method::Post) => return hook_set_status(shard, body),
        ("/join", Method::Post) => return join_route(body),
        ("/health" | "/health/live" | "/metrics", _) => method_not_allowed("GET, OPTIONS"),
        ("/hook/set-status" | "/join", _) => method_not_allowed("POST, OPTIONS"),
        _ => error_json(404, "not found"),
    };
    Outcome::Respond(response)
}

fn method_not_allowed(allow: &'static str) -> Response {
    error_json(405, "method not allowed").with_header("Allow", allow)
}

/// RFC 6455 §4.2.1: anything short of a well-formed version-13 GET upgrade
/// is refused, never upgraded.
fn websocket_upgrade(head: &RequestHead) -> Outcome {
    let refuse = |status: u16, msg: &str| Outcome::Respond(error_json(status, msg));
    if head.method != Method::Get {
        return refuse(400, "WebSocket upgrade must be a GET");
    }
    if !head.upgrade_websocket || !head.connection_upgrade {
        return Outcome::Respond(
            error_json(426, "this endpoint speaks WebSocket only")
                .with_header("Upgrade", "websocket"),
        );
    }
    if head.ws_version.as_deref() != Some("13") {
        return Outcome::Respond(
            error_json(426, "unsupported Sec-WebSocket-Version")
                .with_header("Sec-WebSocket-Version", "13"),
        );
    }
    match &head.ws_key {
        Some(key) if ws::is_valid_client_key(key) => Outcome::Upgrade { key: key.clone() },
        _ => refuse(400, "missing or invalid Sec-WebSocket-Key"),
    }
}

fn health(shard: &Shard) -> Response {
    let ctx = &shard.ctx;
    let up = ctx.db_status.is_up();
    let body = serde_json::json!({
        "status": if up { "ok" } else { "degraded" },
        "db": if up { "up" } else { "down" },
        "version": env!("CARGO_PKG_VERSION"),
        "gitSha": ctx.config.git_sha,
        "uptime": ctx.started_at.elapsed().as_secs(),
    });
    Response::json(if up { 200 } else { 503 }, body.to_string().into_bytes())
}

/// Liveness (PROTOCOL.md §2): answered by a shard's loop, so 200 means the
/// process serves requests; Postgres being away must not get it restarted.
fn live(shard: &Shard) -> Response {
    let body = serde_json::json!({
        "status": "ok",
        "uptime": shard.ctx.started_at.elapsed().as_secs(),
    });
    Response::json(200, body.to_string().into_bytes())
}

fn metrics(shard: &Shard) -> Response {
    let ctx = &shard.ctx;
    ctx.metrics.global().set_db_healthy(ctx.db_status.is_up());
    Response::new(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        ctx.metrics.render().into_bytes(),
    )
}

fn hook_set_status(shard: &Shard, body: &mut [u8]) -> Outcome {
    let signal = match hook::parse_signal(body) {
        Ok(signal) => signal,
        Err(e) => {
            shard.metrics.hook_request(false);
            return Outcome::Respond(error_json(e.status(), &e.to_string()));
        }
    };
    let allowed = shard
        .ctx
        .hook_limiter
        .lock()
        .expect("hook limiter lock")
        .allow(hook::hook_key(&signal), Instant::now());
    shard.metrics.hook_request(!allowed);
    if !allowed {
        return Outcome::Respond(error_json(
            429,
            "rate limited: too many hook signals for this (pid, cwd)",
        ));
    }
    Outcome::Hook(signal)
}

/// Applies a hook signal on the node whose session matches it better than
/// `local` (this node's best): its presence id, or `None` when no node has
/// a better one (or it closed meanwhile).
async fn apply_elsewhere(
    cluster: &Cluster,
    signal: &HookSignal,
    local: &Option<(HookTarget, HookRank)>,
) -> Option<Box<str>> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    cluster
        .send(BusCommand::Hook {
            signal: signal.clone(),
            reply,
        })
        .ok()?;
    let candidate = answer.await.ok()??;
    if local
        .as_ref()
        .is_some_and(|(_, rank)| *rank >= candidate.rank)
    {
        return None;
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    cluster
        .send(BusCommand::HookApply {
            signal: signal.clone(),
            candidate,
            reply,
        })
        .ok()?;
    answer.await.ok()?
}

/// PROTOCOL.md §5: the live session matching (pid, cwd), else the newest
/// live one with that cwd, on whichever shard (or node) it is; with none,
/// the signal is stashed for a session that connects within 10 s.
async fn apply_hook(shard: &Rc<Shard>, signal: HookSignal) -> Response {
    let ctx = &shard.ctx;
    let local = ctx.hooks.find(signal.pid, &signal.cwd);
    if let Some(cluster) = &ctx.cluster {
        // Another node may have a better match (README "Several nodes"):
        // a pid match here is the best there is, else every node is asked.
        let exact_here = local.as_ref().is_some_and(|(_, rank)| rank.pid_match);
        if !exact_here {
            if let Some(presence_id) = apply_elsewhere(cluster, &signal, &local).await {
                return hook_applied(&signal, &presence_id);
            }
        }
    }
    if let Some((target, _)) = local {
        let (reply, answer) = tokio::sync::oneshot::channel();
        shard.send_to(
            target.shard,
            ShardEvent::HookStatus {
                conn: target.conn,
                status: signal.status,
                reply,
            },
        );
        if let Ok(Some(presence_id)) = answer.await {
            return hook_applied(&signal, &presence_id);
        }
        // The session closed meanwhile: stash, as if it had not been there.
    }
    tracing::info!(target: "hook", pid = signal.pid, cwd = %signal.cwd, status = signal.status.as_str(), pending = true, "hook");
    ctx.hooks
        .stash(signal.pid, &signal.cwd, signal.status, Instant::now());
    if let Some(cluster) = &ctx.cluster {
        let _ = cluster.send(BusCommand::Stash(signal.clone()));
    }
    let stash = PendingStatus {
        id: shard.ids.borrow_mut().next_id(),
        pid: signal.pid,
        cwd: signal.cwd,
        status: signal.status.as_str().to_owned(),
        created_at: SystemTime::now(),
    };
    if ctx
        .db
        .try_send(DbCommand::StashPendingStatus(stash))
        .is_err()
    {
        // Memory has it: a session connecting soon still starts with it.
        tracing::warn!(target: "hook", "pending status not written: db queue full");
    }
    Response::json(200, br#"{"ok":true,"pending":true}"#.to_vec())
}

/// `{"ok":true,"presence_id":…}` for a signal a session took.
fn hook_applied(signal: &HookSignal, presence_id: &str) -> Response {
    tracing::info!(target: "hook", pid = signal.pid, cwd = %signal.cwd, status = signal.status.as_str(),
        presence = %presence_id, "hook");
    let mut body = Vec::with_capacity(64);
    body.extend_from_slice(br#"{"ok":true,"presence_id":"#);
    crate::protocol::write_json_str(&mut body, presence_id);
    body.push(b'}');
    Response::json(200, body)
}

/// Takes one token from the client address's `/join` bucket.
fn join_allowed(shard: &Shard, client: IpAddr) -> bool {
    shard
        .ctx
        .join_limiter
        .lock()
        .expect("join limiter lock")
        .allow(join::client_key(client), Instant::now())
}

/// `{"ok":false,"error":code,"message":…}` with the refusal's status.
fn join_refusal(e: &JoinError) -> Response {
    error_code_json(e.status(), e.code(), &e.to_string())
}

/// PROTOCOL.md §12 steps 1 and 2, on the shard (pure, and a signature
/// check like a hello's); the rest is the db thread's.
fn join_route(body: &mut [u8]) -> Outcome {
    match join::validate(body) {
        Ok(request) => Outcome::Join(Box::new(request)),
        Err(e) => {
            tracing::info!(target: "join", outcome = e.code(), "join");
            Outcome::Respond(join_refusal(&e))
        }
    }
}

/// Steps 3 to 7 on the db thread (its own connection and queue), awaited
/// here without blocking the loop. A new member is in the directory by
/// the time the answer comes, and is audited `member_joined`.
async fn apply_join(shard: &Rc<Shard>, request: JoinRequest) -> Response {
    let mesh_id = request.payload.mesh_id.clone();
    let member_id = shard.ids.borrow_mut().next_id();
    let unavailable = |why: &str| {
        tracing::warn!(target: "join", mesh = %mesh_id, error = %why, "join unavailable");
        error_code_json(
            503,
            "unavailable",
            "enrollment is unavailable (the database is away); try again",
        )
    };
    let Some(answer) = shard.ctx.db.join(request, member_id) else {
        return unavailable("join queue full");
    };
    match answer.await {
        Ok(Ok(joined)) => {
            if let Some((mesh, member)) = &joined.installed {
                shard.audit(AuditEvent::member_joined(
                    mesh,
                    member,
                    joined.role.as_str(),
                ));
            }
            let outcome = if joined.already_member {
                "already_member"
            } else {
                "joined"
            };
            tracing::info!(target: "join", mesh = %mesh_id, member = %joined.member_id,
                role = joined.role.as_str(), outcome, "join");
            Response::json(
                200,
                join::success_body(&joined.member_id, joined.already_member),
            )
        }
        Ok(Err(JoinFailed::Refused(e))) => {
            tracing::info!(target: "join", mesh = %mesh_id, outcome = e.code(), "join");
            join_refusal(&e)
        }
        Ok(Err(JoinFailed::Unavailable(why))) => unavailable(&why),
        Err(_) => unavailable("db thread gone"),
    }
}
