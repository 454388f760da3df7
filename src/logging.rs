//! One JSON object per line on stderr (PROTOCOL.md §6):
//! `{"ts":"…","level":"info","component":"<target>","msg":"<event name>",…}`
//! followed by the event's fields as JSON values.
//!
//! Callers write `tracing::info!(target: "ws", peer = %addr, code = 1000, "ws close")`.
//! Each line is formatted into one buffer and written with one call on a
//! locked stderr, so lines from different shard threads never interleave.

use std::fmt;
use std::io::Write;
use std::time::SystemTime;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// Parses a `LOG_LEVEL` value (`error|warn|info|debug|trace`, any case).
pub fn parse_level(s: &str) -> Option<Level> {
    match s.trim().to_ascii_lowercase().as_str() {
        "error" => Some(Level::ERROR),
        "warn" | "warning" => Some(Level::WARN),
        "info" => Some(Level::INFO),
        "debug" => Some(Level::DEBUG),
        "trace" => Some(Level::TRACE),
        _ => None,
    }
}

/// Installs the global subscriber: JSON lines on stderr at `LOG_LEVEL`
/// (default info; an unparseable value also means info — `Config` reports
/// it as an error). A second call does nothing.
pub fn init() {
    let level = std::env::var("LOG_LEVEL")
        .ok()
        .and_then(|v| parse_level(&v))
        .unwrap_or(Level::INFO);
    init_with_level(level);
    // A panic is one JSON line like every other event, naming the thread.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()));
        tracing::error!(target: "broker", thread = thread.name().unwrap_or("?"), panic = %message,
            location = location.as_deref().unwrap_or("?"), "panic");
    }));
}

/// Like [`init`] with an explicit level. Returns false when a global
/// subscriber was already installed.
pub fn init_with_level(level: Level) -> bool {
    let subscriber = tracing_subscriber::registry().with(JsonLayer::new(level, StderrSink));
    tracing::subscriber::set_global_default(subscriber).is_ok()
}

/// Where finished lines go. A line includes its trailing `\n`.
pub trait LineSink: Send + Sync + 'static {
    fn write_line(&self, line: &[u8]);
}

/// The production sink: one `write_all` on a locked stderr per line.
pub struct StderrSink;

impl LineSink for StderrSink {
    fn write_line(&self, line: &[u8]) {
        let mut err = std::io::stderr().lock();
        // Nowhere left to report a failed log write.
        let _ = err.write_all(line);
    }
}

/// A `tracing_subscriber::Layer` that formats each event as one JSON line.
pub struct JsonLayer<S> {
    max: Level,
    sink: S,
}

impl<S: LineSink> JsonLayer<S> {
    pub fn new(max: Level, sink: S) -> Self {
        JsonLayer { max, sink }
    }
}

/// Collects an event's fields in the order they were written.
#[derive(Default)]
struct FieldVisitor {
    msg: Option<String>,
    fields: Vec<(String, Value)>,
}

impl FieldVisitor {
    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        if name == "message" {
            self.msg = Some(match value {
                Value::String(s) => s,
                other => other.to_string(),
            });
            return;
        }
        // The four fixed keys always come from the event itself; a field
        // of the same name is kept under a suffixed key instead of
        // producing a duplicate JSON key.
        let key = match name {
            "ts" | "level" | "component" | "msg" => format!("{name}_"),
            // `r#type = ..` in a macro arrives as "r#type".
            _ => name.strip_prefix("r#").unwrap_or(name).to_owned(),
        };
        self.fields.push((key, value));
    }
}

impl Visit for FieldVisitor {
    fn record_f64(&mut self, field: &Field, value: f64) {
        // Non-finite floats have no JSON form: serde_json makes them null.
        self.put(field, Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_i128(&mut self, field: &Field, value: i128) {
        let v = i64::try_from(value).map_or_else(|_| Value::from(value.to_string()), Value::from);
        self.put(field, v);
    }
    fn record_u128(&mut self, field: &Field, value: u128) {
        let v = u64::try_from(value).map_or_else(|_| Value::from(value.to_string()), Value::from);
        self.put(field, v);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%x` fields and the message (`fmt::Arguments`) arrive here; their
        // Debug output is the text we want.
        self.put(field, Value::from(format!("{value:?}")));
    }
}

fn level_str(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// Formats one event as a JSON line (with the trailing newline).
fn format_line(ts: SystemTime, event: &Event<'_>) -> Vec<u8> {
    let meta = event.metadata();
    let mut v = FieldVisitor::default();
    event.record(&mut v);

    let mut line = String::with_capacity(128);
    // serde_json's string serialization does the escaping; a String in,
    // so it cannot fail.
    let json = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
    line.push_str("{\"ts\":\"");
    line.push_str(&humantime::format_rfc3339_millis(ts).to_string());
    line.push_str("\",\"level\":\"");
    line.push_str(level_str(meta.level()));
    line.push_str("\",\"component\":");
    line.push_str(&json(meta.target()));
    line.push_str(",\"msg\":");
    line.push_str(&json(v.msg.as_deref().unwrap_or("")));
    for (key, value) in &v.fields {
        line.push(',');
        line.push_str(&json(key));
        line.push(':');
        line.push_str(&value.to_string());
    }
    line.push_str("}\n");
    line.into_bytes()
}

impl<Sub: Subscriber, S: LineSink> Layer<Sub> for JsonLayer<S> {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if metadata.level() <= &self.max {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>, _ctx: Context<'_, Sub>) -> bool {
        metadata.level() <= &self.max
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::from_level(self.max))
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, Sub>) {
        self.sink.write_line(&format_line(SystemTime::now(), event));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl LineSink for Buffer {
        fn write_line(&self, line: &[u8]) {
            self.0.lock().unwrap().extend_from_slice(line);
        }
    }

    impl Buffer {
        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().unwrap().clone();
            String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    /// Runs `f` with a capturing JSON layer as the thread's subscriber.
    fn capture(level: Level, f: impl FnOnce()) -> Vec<String> {
        let buf = Buffer::default();
        let sub = tracing_subscriber::registry().with(JsonLayer::new(level, buf.clone()));
        tracing::subscriber::with_default(sub, f);
        buf.lines()
    }

    #[test]
    fn fixed_keys_then_fields_in_order() {
        let addr: std::net::SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let lines = capture(Level::INFO, || {
            tracing::info!(target: "ws", peer = %addr, code = 1000, clean = true, ratio = 0.5, neg = -3, "ws close");
        });
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert!(line.starts_with("{\"ts\":\""), "{line}");
        let after_ts = line.split_once("\",\"level\"").unwrap().1;
        assert!(
            after_ts.starts_with(":\"info\",\"component\":\"ws\",\"msg\":\"ws close\",\"peer\":\"127.0.0.1:4000\",\"code\":1000,\"clean\":true,\"ratio\":0.5,\"neg\":-3}"),
            "{line}"
        );
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["code"], 1000);
        assert_eq!(v["clean"], true);
        assert_eq!(v["peer"], "127.0.0.1:4000");
    }

    #[test]
    fn timestamp_is_rfc3339_utc_with_millis() {
        let lines = capture(
            Level::INFO,
            || tracing::warn!(target: "db", "db ping failed"),
        );
        let v: Value = serde_json::from_str(&lines[0]).unwrap();
        let ts = v["ts"].as_str().unwrap();
        // 2025-11-27T03:16:00.123Z
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.ends_with('Z'));
        assert_eq!(&ts[19..20], ".");
        assert!(humantime::parse_rfc3339(ts).is_ok());
        assert_eq!(v["level"], "warn");
        assert_eq!(v["component"], "db");
    }

    #[test]
    fn strings_are_escaped_and_lines_stay_single() {
        let lines = capture(Level::INFO, || {
            let cwd = "/tmp/a \"b\"\n\\c\u{1}é";
            tracing::info!(target: "hook", cwd, err = ?"x\ny", "hook\nline");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        let v: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["cwd"], "/tmp/a \"b\"\n\\c\u{1}é");
        assert_eq!(v["msg"], "hook\nline");
        // `?` uses Debug: the quotes are part of the text.
        assert_eq!(v["err"], "\"x\\ny\"");
    }

    #[test]
    fn level_filter() {
        let lines = capture(Level::INFO, || {
            tracing::debug!(target: "x", "hidden");
            tracing::trace!(target: "x", "hidden");
            tracing::error!(target: "x", "shown");
        });
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("\"level\":\"error\""));

        let lines = capture(Level::TRACE, || {
            tracing::trace!(target: "x", "shown");
        });
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("\"level\":\"trace\""));

        let lines = capture(Level::ERROR, || tracing::warn!(target: "x", "hidden"));
        assert!(lines.is_empty());
    }

    #[test]
    fn reserved_names_and_large_numbers() {
        let lines = capture(Level::INFO, || {
            tracing::info!(target: "t", msg = "inner", level = 3u8, big = u128::MAX, small = 7i128, "outer");
        });
        let v: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["msg"], "outer");
        assert_eq!(v["level"], "info");
        assert_eq!(v["msg_"], "inner");
        assert_eq!(v["level_"], 3);
        assert_eq!(v["big"], u128::MAX.to_string());
        assert_eq!(v["small"], 7);
    }

    #[test]
    fn default_target_is_module_path_and_errors_use_display() {
        let e = std::io::Error::other("boom");
        let lines = capture(Level::INFO, || {
            tracing::info!(error = &e as &(dyn std::error::Error + 'static), "x");
        });
        let v: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["component"], "meshbroker::logging::tests");
        assert_eq!(v["error"], "boom");
    }

    #[test]
    fn parse_levels() {
        assert_eq!(parse_level("ERROR"), Some(Level::ERROR));
        assert_eq!(parse_level("warn"), Some(Level::WARN));
        assert_eq!(parse_level(" info "), Some(Level::INFO));
        assert_eq!(parse_level("debug"), Some(Level::DEBUG));
        assert_eq!(parse_level("trace"), Some(Level::TRACE));
        assert_eq!(parse_level("loud"), None);
    }
}
