//! The floor under `loadgen broadcast --floor`, every delivery check on:
//! the built binary on a port of its own choosing, two threads so pushes
//! also cross between them.
use loadgen::{Args, Report};
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStderr, Command, Stdio};

struct Floor {
    child: Child,
    port: u16,
    // Held open: the floor's stderr must not hit a closed pipe.
    _stderr: BufReader<ChildStderr>,
}

impl Floor {
    fn start() -> Floor {
        let mut child = Command::new(env!("CARGO_BIN_EXE_floor"))
            .args(["--port", "0", "--threads", "2"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("start floor");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).expect("floor's first line");
        let port = line
            .trim()
            .strip_prefix("floor listening on 127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        Floor {
            child,
            port,
            _stderr: stderr,
        }
    }

    fn broadcast(&self, meshes: usize) -> Report {
        let url = format!("ws://127.0.0.1:{}/ws", self.port);
        let pid = self.child.id().to_string();
        let meshes = meshes.to_string();
        #[rustfmt::skip]
        let argv = [
            "loadgen", "broadcast", "--floor", "--url", &url, "--broker-pid", &pid,
            "--meshes", &meshes, "--peers", "20", "--duration", "1", "--window", "4",
            "--threads", "2", "--quiet",
        ];
        let config = Args::parse_from_iter(argv).unwrap().validate().unwrap();
        loadgen::run(&config).expect("loadgen run")
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every expected push arrived once; nothing came that no send called for.
/// (`Report::ok` does not count unexpected or foreign pushes, so they are
/// asserted here; the broadcast scenario keeps no order check of its own.)
fn assert_exact(report: &Report) {
    assert!(report.ok(), "{}", report.failure_summary());
    assert!(report.pushes > 0 && report.sent > 0, "{report:?}");
    assert_eq!(report.acked, report.sent);
    assert_eq!(report.send_errors, 0);
    assert_eq!((report.lost, report.duplicates), (0, 0));
    assert_eq!((report.unexpected_pushes, report.foreign_pushes), (0, 0));
    assert_eq!(report.pushes, report.expected_pushes);
    assert!(
        report.broker_cpu_us_per_push.is_some(),
        "the floor's CPU is read"
    );
}

#[test]
fn one_mesh_gets_every_push_once() {
    let floor = Floor::start();
    let report = floor.broadcast(1);
    assert_exact(&report);
    // A broadcast reaches every member but its sender.
    assert_eq!(report.expected_pushes, report.acked * 19);
}

#[test]
fn two_meshes_never_see_each_others_pushes() {
    let floor = Floor::start();
    let report = floor.broadcast(2);
    // A push crossing meshes reads as its sender's index in the other mesh:
    // a duplicate there, or a push beyond the expected count.
    assert_exact(&report);
    assert_eq!(report.meshes, 2);
    assert_eq!(report.expected_pushes, report.acked * 19);
}
