//! The HTTP side of the one port: `/hook/set-status`, `/health`, `/metrics`,
//! 404, CORS preflight, keep-alive and the request-head limit.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::{http, metric, poll_until, query_rows, raw_exchange, Broker, HttpReply};

const JSON_CT: (&str, &str) = ("Content-Type", "application/json");

fn post_hook(broker: &Broker, body: &[u8]) -> HttpReply {
    http(broker.addr(), "POST", "/hook/set-status", &[JSON_CT], body)
}

fn assert_cors(reply: &HttpReply, what: &str) {
    assert_eq!(
        reply.header("Access-Control-Allow-Origin"),
        Some("*"),
        "{what}: {:?}",
        reply.headers
    );
}

/// A 400 `{"ok":false,"error":"…"}`.
fn assert_bad_request(reply: &HttpReply, what: &str) {
    assert_eq!(reply.status, 400, "{what}: {}", reply.text());
    let body = reply.json();
    assert_eq!(body["ok"], false, "{what}: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: {body}"
    );
    assert_cors(reply, what);
}

/// A hook body of exactly `len` bytes, padded with a long cwd.
fn hook_body_of_len(len: usize) -> Vec<u8> {
    let shell = r#"{"cwd":"/pad/","status":"idle"}"#;
    let pad = len - shell.len();
    let body = format!(r#"{{"cwd":"/pad/{}","status":"idle"}}"#, "p".repeat(pad));
    assert_eq!(body.len(), len);
    body.into_bytes()
}

#[test]
fn hook_validation_size_limit_rate_limit_and_stash() {
    let db = common::fresh_database();
    let broker = Broker::start(&[
        ("DATABASE_URL", &db),
        ("MAX_MESSAGE_BYTES", "2048"),
        ("HOOK_RATE_LIMIT_PER_MIN", "3"),
    ]);
    // Migrations have run once the db is up.
    broker.wait_health(200);

    assert_bad_request(&post_hook(&broker, b"{not json"), "bad JSON");
    assert_bad_request(&post_hook(&broker, b"[1,2]"), "a JSON array");
    assert_bad_request(&post_hook(&broker, br#"{"status":"idle"}"#), "no cwd");
    assert_bad_request(&post_hook(&broker, br#"{"cwd":"/v"}"#), "no status");
    assert_bad_request(
        &post_hook(&broker, br#"{"cwd":"/v","status":"busy"}"#),
        "status busy",
    );

    // Size limit is inclusive.
    let exact = post_hook(&broker, &hook_body_of_len(2048));
    assert_eq!(
        exact.status,
        200,
        "exactly MAX_MESSAGE_BYTES: {}",
        exact.text()
    );
    let over = post_hook(&broker, &hook_body_of_len(2049));
    assert_eq!(over.status, 413, "MAX_MESSAGE_BYTES + 1: {}", over.text());
    assert_cors(&over, "413");

    // Rate limit per (pid, cwd): 3 pass, the 4th is refused; another cwd
    // of the same pid is unaffected.
    let limited = br#"{"cwd":"/rl","pid":4242,"status":"working"}"#;
    for i in 0..3 {
        let reply = post_hook(&broker, limited);
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
    }
    let refused = post_hook(&broker, limited);
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.json()["ok"], false);
    assert_cors(&refused, "429");
    let other = post_hook(
        &broker,
        br#"{"cwd":"/rl-other","pid":4242,"status":"idle"}"#,
    );
    assert_eq!(other.status, 200, "{}", other.text());

    // No live session: stashed, answered pending, written to Postgres.
    let reply = post_hook(&broker, br#"{"cwd":"/proj/nopid","status":"dnd"}"#);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), serde_json::json!({"ok":true,"pending":true}));
    let reply = post_hook(
        &broker,
        br#"{"cwd":"/proj/withpid","pid":77,"status":"working","session_id":"s-1"}"#,
    );
    assert_eq!(reply.json(), serde_json::json!({"ok":true,"pending":true}));
    for (cwd, pid, status) in [("/proj/nopid", 0, "dnd"), ("/proj/withpid", 77, "working")] {
        let row = poll_until(
            Duration::from_secs(10),
            &format!("pending_status row for {cwd}"),
            || {
                query_rows(
                    &db,
                    &format!(
                        "SELECT pid, status::text, status_source::text FROM mesh.pending_status \
                         WHERE cwd = '{cwd}'"
                    ),
                )
                .into_iter()
                .next()
            },
        );
        assert_eq!(row.get::<_, i32>(0), pid, "{cwd}");
        assert_eq!(row.get::<_, String>(1), status, "{cwd}");
        assert_eq!(row.get::<_, String>(2), "hook", "{cwd}");
    }

    // 3 + 1 + 1 requests reached the limiter with valid bodies (+ 2 stashed
    // + 1 at the size limit); one was refused.
    poll_until(Duration::from_secs(10), "hook counters", || {
        let samples = broker.scrape();
        let total = metric(&samples, "broker_hook_requests_total", &[])?;
        let limited = metric(&samples, "broker_hook_requests_rate_limited_total", &[])?;
        (total >= 8.0 && limited == 1.0).then_some(())
    });
}

#[test]
fn metrics_exposition_names_and_http_histogram() {
    let broker = Broker::start(&[]);
    let reply = http(broker.addr(), "GET", "/metrics", &[], b"");
    assert_eq!(reply.status, 200);
    assert_cors(&reply, "/metrics");
    assert!(
        reply
            .header("Content-Type")
            .is_some_and(|ct| ct.starts_with("text/plain") || ct.contains("openmetrics")),
        "{:?}",
        reply.headers
    );
    let text = reply.text();
    let samples = common::parse_metrics(&text);
    for name in [
        "broker_connections_active",
        "broker_connections_total",
        "broker_connections_rejected_total",
        "broker_messages_routed_total",
        "broker_messages_rejected_total",
        "broker_queue_depth",
        "broker_ttl_sweeps_total",
        "broker_ttl_flipped_total",
        "broker_hook_requests_total",
        "broker_hook_requests_rate_limited_total",
        "broker_db_healthy",
        "broker_http_request_duration_seconds_bucket",
        "broker_http_request_duration_seconds_count",
        "broker_http_request_duration_seconds_quantiles",
    ] {
        assert!(
            samples.iter().any(|s| s.name == name),
            "{name} missing from:\n{text}"
        );
    }
    for reason in ["capacity", "unauthorized"] {
        assert!(
            metric(
                &samples,
                "broker_connections_rejected_total",
                &[("reason", reason)]
            )
            .is_some(),
            "rejected reason {reason} missing"
        );
    }
    for q in ["0.5", "0.9", "0.99", "0.999"] {
        assert!(
            metric(
                &samples,
                "broker_http_request_duration_seconds_quantiles",
                &[("quantile", q)]
            )
            .is_some(),
            "quantile {q} missing"
        );
    }
    // A histogram's +Inf bucket equals its count.
    let count_of = |s: &[common::Sample]| {
        metric(s, "broker_http_request_duration_seconds_count", &[]).unwrap()
    };
    let inf = metric(
        &samples,
        "broker_http_request_duration_seconds_bucket",
        &[("le", "+Inf")],
    )
    .expect("+Inf bucket");
    assert_eq!(inf, count_of(&samples));

    let before = count_of(&samples);
    for _ in 0..5 {
        assert_eq!(http(broker.addr(), "GET", "/nope", &[], b"").status, 404);
    }
    // Histograms are published once a second.
    poll_until(Duration::from_secs(10), "http histogram to grow", || {
        (count_of(&broker.scrape()) >= before + 5.0).then_some(())
    });
}

#[test]
fn not_found_cors_keep_alive_and_head_limit() {
    let broker = Broker::start(&[]);
    let addr = broker.addr();

    let reply = http(addr, "GET", "/definitely/not/here", &[], b"");
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert_cors(&reply, "404");

    for path in [
        "/",
        "/ws",
        "/health",
        "/metrics",
        "/hook/set-status",
        "/x/y",
    ] {
        let reply = http(
            addr,
            "OPTIONS",
            path,
            &[
                ("Origin", "https://example.com"),
                ("Access-Control-Request-Method", "POST"),
            ],
            b"",
        );
        assert_eq!(reply.status, 204, "OPTIONS {path}");
        assert_cors(&reply, path);
        let methods = reply
            .header("Access-Control-Allow-Methods")
            .unwrap_or_else(|| panic!("OPTIONS {path}: no Allow-Methods"));
        for m in ["POST", "GET", "OPTIONS"] {
            assert!(methods.contains(m), "OPTIONS {path}: {methods}");
        }
        let headers = reply
            .header("Access-Control-Allow-Headers")
            .unwrap_or_else(|| panic!("OPTIONS {path}: no Allow-Headers"));
        assert!(
            headers.to_ascii_lowercase().contains("content-type"),
            "OPTIONS {path}: {headers}"
        );
    }

    // Every answer carries the CORS header, whatever its status.
    let answers = [
        http(addr, "GET", "/health", &[], b""),
        http(addr, "GET", "/metrics", &[], b""),
        http(addr, "POST", "/hook/set-status", &[JSON_CT], b"nope"),
        http(addr, "DELETE", "/health", &[], b""),
        http(addr, "GET", "/ws", &[], b""),
    ];
    for reply in &answers {
        assert_cors(reply, &format!("status {}", reply.status));
    }

    // Keep-alive: two requests on one connection, both answered.
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let first = common::http_on(&mut stream, "GET", "/metrics", &[], b"");
    assert_eq!(first.status, 200);
    assert_ne!(
        first.header("Connection").map(str::to_ascii_lowercase),
        Some("close".to_owned())
    );
    let second = common::http_on(&mut stream, "GET", "/nope", &[], b"");
    assert_eq!(second.status, 404);
    let third = common::http_on(&mut stream, "OPTIONS", "/health", &[], b"");
    assert_eq!(third.status, 204);

    // A request head over 16 KiB.
    let big = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
        "f".repeat(17 * 1024)
    );
    let answer = String::from_utf8_lossy(&raw_exchange(addr, big.as_bytes())).into_owned();
    assert!(
        answer.starts_with("HTTP/1.1 431 "),
        "head over 16 KiB: {answer:?}"
    );
    // Just under the limit is served.
    let fits = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Filler: {}\r\n\r\n",
        "f".repeat(15 * 1024)
    );
    let answer = String::from_utf8_lossy(&raw_exchange(addr, fits.as_bytes())).into_owned();
    assert!(
        answer.starts_with("HTTP/1.1 200 ") || answer.starts_with("HTTP/1.1 503 "),
        "head under 16 KiB: {answer:?}"
    );
}

/// The bytes after the first response head of `answer`.
fn after_first_head(answer: &[u8]) -> &[u8] {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(answer)));
    &answer[end + 4..]
}

#[test]
fn pipelined_requests_and_head_without_body() {
    let broker = Broker::start(&[]);
    let addr = broker.addr();

    // Two pipelined GETs in one write: two answers, in order.
    let answer = raw_exchange(
        addr,
        b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n\
          OPTIONS /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&answer).into_owned();
    assert!(text.starts_with("HTTP/1.1 404 "), "{text:?}");
    let second = text
        .find("HTTP/1.1 204 ")
        .unwrap_or_else(|| panic!("{text:?}"));
    assert!(second > 0);

    // HEAD: the head of a GET, no body, so the next response on the
    // connection starts right after it.
    for path in ["/health", "/health/live", "/metrics"] {
        let request = format!(
            "HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n\
             GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let answer = raw_exchange(addr, request.as_bytes());
        let text = String::from_utf8_lossy(&answer).into_owned();
        assert!(
            text.starts_with("HTTP/1.1 200 ") || text.starts_with("HTTP/1.1 503 "),
            "HEAD {path}: {text:?}"
        );
        let rest = String::from_utf8_lossy(after_first_head(&answer)).into_owned();
        assert!(
            rest.starts_with("HTTP/1.1 404 "),
            "HEAD {path} answered with a body: {text:?}"
        );
    }
}

#[test]
fn hook_with_expect_continue() {
    use std::io::{Read, Write};
    let broker = Broker::start(&[("MAX_MESSAGE_BYTES", "2048")]);
    let body = br#"{"cwd":"/expect","pid":5,"status":"idle"}"#;
    let mut stream = TcpStream::connect(broker.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = format!(
        "POST /hook/set-status?from=curl HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Expect: 100-continue\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body).unwrap();
    let mut rest = String::new();
    let _ = stream.read_to_string(&mut rest);
    assert!(rest.starts_with("HTTP/1.1 200 "), "{rest:?}");
    assert!(rest.ends_with(r#"{"ok":true,"pending":true}"#), "{rest:?}");

    // Over the limit: refused without asking for the body.
    let answer = raw_exchange(
        broker.addr(),
        b"POST /hook/set-status HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\
          Content-Length: 2049\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&answer).into_owned();
    assert!(text.starts_with("HTTP/1.1 413 "), "{text:?}");
}
