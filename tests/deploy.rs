//! The deployment files parse: the compose stack has the services it
//! promises and mounts files that exist; its Prometheus config passes
//! `promtool`; the systemd unit passes
//! `systemd-analyze verify` (where systemd's tools are installed) with the
//! built binary in place of the installed one.
mod common;

use std::process::Command;

const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/systemd/meshbroker.service"
);

#[test]
fn the_systemd_unit_verifies() {
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("SKIPPED: systemd-analyze not installed");
        return;
    };
    if !probe.status.success() {
        eprintln!("SKIPPED: systemd-analyze does not run here");
        return;
    }
    let dir = common::world_traversable_tempdir("meshbroker-unit-");
    let env_file = dir.join("env");
    std::fs::write(&env_file, "NODE_ENV=production\n").unwrap();
    let unit = std::fs::read_to_string(UNIT)
        .unwrap()
        .replace(
            "/usr/local/bin/meshbroker",
            env!("CARGO_BIN_EXE_meshbroker"),
        )
        .replace("/etc/meshbroker/env", &env_file.display().to_string());
    for needed in [
        "TimeoutStopSec=20",
        "LimitNOFILE=",
        "LimitMEMLOCK=",
        "Restart=on-failure",
    ] {
        assert!(unit.contains(needed), "the unit lacks {needed}");
    }
    // A unit that cannot be wrong first: where even it does not verify
    // cleanly (no systemd running, odd container), the check means nothing.
    let control = dir.join("control.service");
    std::fs::write(&control, "[Service]\nExecStart=/bin/true\n").unwrap();
    if verify(&control).is_err() {
        eprintln!("SKIPPED: systemd-analyze verify does not work here");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let path = dir.join("meshbroker.service");
    std::fs::write(&path, unit).unwrap();
    let verdict = verify(&path);
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(said) = verdict {
        panic!("systemd-analyze verify: {said}");
    }
}

/// `systemd-analyze verify`: Ok when it passes with nothing to say.
fn verify(path: &std::path::Path) -> Result<(), String> {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(path)
        .output()
        .map_err(|e| e.to_string())?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said)
    }
}

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

fn yaml(path: &str) -> yaml_rust2::Yaml {
    let text = std::fs::read_to_string(format!("{DEPLOY}/{path}")).unwrap();
    let mut docs = yaml_rust2::YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{path} is not YAML: {e}"));
    assert_eq!(docs.len(), 1, "{path}: one document");
    docs.remove(0)
}

#[test]
fn the_compose_file_has_the_stack_it_promises() {
    let compose = yaml("compose.yaml");
    let services = &compose["services"];
    for name in ["postgres", "broker", "prometheus", "grafana"] {
        assert!(
            !services[name].is_badvalue(),
            "compose has no {name} service"
        );
        assert!(
            services[name]["restart"].as_str().is_some(),
            "{name} has no restart policy"
        );
    }
    let broker = &services["broker"];
    assert_eq!(broker["stop_signal"].as_str(), Some("SIGTERM"));
    let grace = broker["stop_grace_period"].as_str().unwrap_or_default();
    let seconds: u64 = grace.trim_end_matches('s').parse().unwrap_or(0);
    assert!(
        seconds >= 10,
        "stop_grace_period {grace:?} is under the 10 s shutdown"
    );
    assert!(services["postgres"]["image"]
        .as_str()
        .is_some_and(|i| i.starts_with("postgres:15")));
    assert!(
        !broker["depends_on"]["postgres"].is_badvalue(),
        "the broker waits for Postgres"
    );
    for volume in ["pgdata", "promdata", "grafanadata"] {
        assert!(
            !compose["volumes"][volume].is_badvalue(),
            "no volume {volume}"
        );
    }
    // What the compose file mounts is in the repository.
    for file in [
        "prometheus/prometheus.yml",
        "prometheus/alerts.yml",
        "grafana/meshbroker.json",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/meshbroker.yml",
    ] {
        assert!(
            std::path::Path::new(DEPLOY).join(file).is_file(),
            "{file} missing"
        );
        if file.ends_with(".yml") {
            yaml(file);
        }
    }
}

#[test]
fn the_compose_prometheus_config_passes_promtool() {
    let Ok(probe) = Command::new("promtool").arg("--version").output() else {
        eprintln!("SKIPPED: promtool not installed (Debian package `prometheus`)");
        return;
    };
    assert!(probe.status.success());
    let dir = common::world_traversable_tempdir("meshbroker-promconf-");
    let config = std::fs::read_to_string(format!("{DEPLOY}/prometheus/prometheus.yml"))
        .unwrap()
        .replace(
            "/etc/prometheus/alerts.yml",
            &format!("{DEPLOY}/prometheus/alerts.yml"),
        );
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(&path)
        .output()
        .expect("run promtool");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// No image can be built in the test environment (no Docker daemon): the
/// Dockerfile is held to what an operator relies on.
#[test]
fn the_dockerfile_builds_locked_runs_unprivileged_and_probes_liveness() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let has = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
    assert!(text.contains("cargo build --release --locked"));
    assert!(has("USER meshbroker"), "runs as a non-root user");
    assert!(has("STOPSIGNAL SIGTERM"));
    assert!(has("ARG GIT_SHA"), "GIT_SHA reaches /health");
    assert!(
        text.contains(r#"CMD ["/usr/local/bin/meshbroker", "healthcheck"]"#),
        "the HEALTHCHECK probes liveness with the binary itself"
    );
    assert!(
        !lines
            .iter()
            .any(|l| !l.starts_with('#') && l.contains("curl")),
        "no curl in the image"
    );
}
