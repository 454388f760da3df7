//! The deployment files parse: the systemd unit passes
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
