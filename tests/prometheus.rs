//! The operator's alert rules against a real Prometheus (Debian's
//! `prometheus` package, installed by `.ci/run`): they load, every metric
//! they name is one the broker exports, and the database-down alert goes
//! pending when Postgres stops and resolves when it is back.
mod common;
mod support;

use common::{http, Broker};
use meshbroker::devdb::LocalPostgres;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::*;

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/grafana/meshbroker.json"
);

/// Every PromQL expression of every dashboard panel, with its panel.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(DASHBOARD).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            panel["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |t| {
                    (
                        title.clone(),
                        t["expr"].as_str().unwrap_or_default().to_owned(),
                    )
                })
        })
        .collect()
}

fn tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

/// A Prometheus scraping `target` every second, evaluating `RULES`.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    fn start(binary: &Path, target: std::net::SocketAddr) -> Prometheus {
        let dir = common::world_traversable_tempdir("meshbroker-prometheus-");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {RULES}\n\
             scrape_configs:\n  - job_name: meshbroker\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let child = Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        let listening = poll(Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(listening, "prometheus did not listen on {port}");
        Prometheus { child, port, dir }
    }

    fn api(&self, path: &str) -> Value {
        let reply = http(("127.0.0.1", self.port), "GET", path, &[], b"");
        if reply.status != 200 {
            return Value::Null;
        }
        reply.json()
    }

    /// The series an instant query returns.
    fn query(&self, promql: &str) -> Vec<Value> {
        let answer = self.api(&format!("/api/v1/query?query={}", encode(promql)));
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn alert_state(&self, name: &str) -> Option<String> {
        let answer = self.api("/api/v1/alerts");
        answer["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .map(|a| a["state"].as_str().unwrap_or_default().to_owned())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `broker_…` metric name the rules mention.
fn metric_names(rules: &str) -> Vec<String> {
    let mut names: Vec<String> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("broker_"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let Some(promtool) = tool("promtool") else {
        eprintln!("SKIPPED: promtool not installed (Debian package `prometheus`)");
        return;
    };
    let out = Command::new(promtool)
        .args(["check", "rules", RULES])
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alerts_name_exported_metrics_and_the_db_alert_follows_postgres() {
    let Some(binary) = tool("prometheus") else {
        eprintln!("SKIPPED: prometheus not installed (Debian package `prometheus`)");
        return;
    };
    let root = common::world_traversable_tempdir("meshbroker-prom-pg-");
    let pg = LocalPostgres::start(&root.join("data"), true).expect("start Postgres");
    pg.create_database("prom").expect("create database");
    let db = pg.url("prom");
    let broker = Broker::start(&[("DATABASE_URL", &db)]);
    broker.wait_for_log("db healthy", Duration::from_secs(30));
    // Traffic, so that labelled families have series: a send, a close.
    let members = seed_mesh(&db, "prom", 2);
    let mut a = Peer::connect(&broker, &members[0]);
    let b = Peer::connect(&broker, &members[1]);
    a.send(&members[1].pubkey, "now", "bg==", "eA==", "p1");
    b.close();

    let prometheus = Prometheus::start(&binary, broker.addr());
    let up = poll(Duration::from_secs(60), || {
        !prometheus.query("broker_db_healthy == 1").is_empty()
    });
    assert!(up, "Prometheus never scraped a healthy broker");

    let rules = std::fs::read_to_string(RULES).unwrap();
    let names = metric_names(&rules);
    assert!(names.len() >= 8, "{names:?}");
    let missing: Vec<&String> = names
        .iter()
        // A histogram's name stands for its _bucket, _sum and _count series.
        .filter(|name| {
            let series = format!("{{__name__=~\"{name}(_bucket|_sum|_count)?\"}}");
            prometheus.query(&series).is_empty()
        })
        .collect();
    assert!(
        missing.is_empty(),
        "rules name metrics the broker does not export: {missing:?}"
    );

    // Every panel of the dashboard shows something (rates need a few
    // scrapes first).
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{} panel queries", queries.len());
    for (panel, expr) in &queries {
        let shows = poll(Duration::from_secs(30), || {
            !prometheus.query(expr).is_empty()
        });
        assert!(shows, "panel {panel:?}: no series for {expr}");
    }

    pg.stop().expect("stop Postgres");
    let pending = poll(Duration::from_secs(60), || {
        matches!(
            prometheus.alert_state("MeshbrokerDatabaseDown").as_deref(),
            Some("pending" | "firing")
        )
    });
    assert!(
        pending,
        "MeshbrokerDatabaseDown never went pending with Postgres stopped"
    );
    pg.restart().expect("restart Postgres");
    let resolved = poll(Duration::from_secs(60), || {
        prometheus.alert_state("MeshbrokerDatabaseDown").is_none()
    });
    assert!(
        resolved,
        "MeshbrokerDatabaseDown did not resolve with Postgres back"
    );
    drop(a);
    drop(broker);
    let _ = pg.stop();
    let _ = std::fs::remove_dir_all(&root);
}
