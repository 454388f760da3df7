//! Records the build's git commit as `MESHBROKER_BUILD_SHA` (read by
//! `config` when `GIT_SHA` is unset). Outside a git checkout, or without
//! git, nothing is set and the broker reports `unknown`.
use std::path::Path;
use std::process::Command;

fn main() {
    let git_dir = Path::new(".git");
    let head = git_dir.join("HEAD");
    if head.exists() {
        println!("cargo:rerun-if-changed=.git/HEAD");
        // HEAD usually names a branch whose ref file moves on each commit.
        if let Ok(text) = std::fs::read_to_string(&head) {
            if let Some(r) = text.trim().strip_prefix("ref: ") {
                if git_dir.join(r).exists() {
                    println!("cargo:rerun-if-changed=.git/{r}");
                }
            }
        }
        if git_dir.join("packed-refs").exists() {
            println!("cargo:rerun-if-changed=.git/packed-refs");
        }
    } else {
        println!("cargo:rerun-if-changed=build.rs");
    }
    let sha = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    if let Some(sha) = sha {
        println!("cargo:rustc-env=MESHBROKER_BUILD_SHA={sha}");
    }
}
