//! natsref against a real nats-server on a free loopback port (skipped
//! where nats-server is not installed).
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The Debian package installs it in /usr/sbin, others in /usr/bin.
fn nats_server() -> Option<PathBuf> {
    ["/usr/bin/nats-server", "/usr/sbin/nats-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_server() -> Option<Server> {
    let Some(bin) = nats_server() else {
        eprintln!("skipped: nats-server is not installed (apt-get install nats-server)");
        return None;
    };
    // A free port can be taken again before nats-server binds it (other
    // tests pick ports too): a server that exited is started on another.
    for _ in 0..5 {
        let port = free_port();
        let child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let mut server = Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if server.child.try_wait().ok().flatten().is_some() {
                break;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(server);
            }
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("nats-server exited on five free ports");
}

fn natsref(args: &[&str]) -> (Output, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_natsref"))
        .args(args)
        .arg("--json")
        .output()
        .expect("natsref runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, json)
}

#[test]
fn broadcast_ten_peers_loses_nothing() {
    let Some(server) = start_server() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("run");
    let url = format!("nats://127.0.0.1:{}", server.port);
    let pid = server.child.id().to_string();
    let (out, r) = natsref(&[
        "--url",
        &url,
        "--peers",
        "10",
        "--window",
        "4",
        "--duration",
        "1",
        "--server-pid",
        &pid,
        "--hgrm",
        prefix.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{r}");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["failure"], serde_json::Value::Null, "{r}");
    let pushes = r["pushes"].as_u64().unwrap();
    assert!(pushes > 0, "{r}");
    assert_eq!(r["expected_pushes"].as_u64(), Some(pushes), "{r}");
    assert_eq!(r["expected_pushes"], r["sent"].as_u64().unwrap() * 9, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["duplicates"], 0, "{r}");
    assert_eq!(r["order_violations"], 0, "{r}");
    assert_eq!(r["acked"], r["sent"], "{r}");
    assert_eq!(r["push_ms"]["count"].as_u64(), Some(pushes), "{r}");
    assert_eq!(r["broker_pid"].as_u64(), Some(server.child.id() as u64));
    assert!(r["broker_cpu_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["broker_cpu_us_per_push"].as_f64().unwrap() > 0.0, "{r}");
    for field in [
        "scenario",
        "mode",
        "sends_per_s",
        "pushes_per_s",
        "loadgen_cpu_pct",
    ] {
        assert!(!r[field].is_null(), "{field} missing: {r}");
    }
    assert_eq!(
        (r["scenario"].as_str(), r["mode"].as_str()),
        (Some("broadcast"), Some("nats"))
    );

    let hgrm = std::fs::read_to_string(dir.path().join("run-push.hgrm")).unwrap();
    assert!(hgrm.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)\n\n"));
    assert!(
        hgrm.contains(&format!("Total count    = {pushes:12}]")),
        "{hgrm}"
    );
}

/// Nobody listening: the run fails, with a report saying why.
#[test]
fn unreachable_server_fails_the_run() {
    let url = format!("nats://127.0.0.1:{}", free_port());
    let (out, r) = natsref(&["--url", &url, "--peers", "2", "--duration", "1"]);
    assert_eq!(out.status.code(), Some(1), "{r}");
    assert_eq!(r["ok"], false);
    let failure = r["failure"].as_str().unwrap();
    assert!(failure.contains("connect"), "{failure}");
}
