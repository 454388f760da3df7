//! Tells the end-to-end test where the broker binary of this workspace is
//! built, so it can reuse the project's test harness (tests/common), which
//! names the broker as `CARGO_BIN_EXE_meshbroker` (cargo only sets that for
//! the broker's own tests).
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    // OUT_DIR is <target>/<profile>/build/loadgen-<hash>/out.
    let profile_dir = out
        .ancestors()
        .nth(3)
        .expect("OUT_DIR has the usual depth")
        .to_path_buf();
    let bin = profile_dir.join(format!("meshbroker{}", std::env::consts::EXE_SUFFIX));
    println!("cargo:rustc-env=CARGO_BIN_EXE_meshbroker={}", bin.display());
    let release = profile_dir.file_name().is_some_and(|n| n != "debug");
    println!(
        "cargo:rustc-env=LOADGEN_BROKER_PROFILE={}",
        if release { "release" } else { "debug" }
    );
    println!(
        "cargo:rustc-env=LOADGEN_CARGO={}",
        std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
    );
    println!("cargo:rerun-if-changed=build.rs");
}
