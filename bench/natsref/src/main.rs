//! natsref: the broadcast load of `loadgen broadcast`, against nats-server,
//! for the reference figures beside meshbroker's (bench/RESULTS.md).
//!
//! # Layout
//! - `cli`    — command line, validated into a [`cli::Config`].
//! - `proto`  — the NATS core client protocol: server frames parsed in
//!   place, the client lines.
//! - `client` — one connection's task: subscribe, publish in a closed loop
//!   (PING/PONG as the ack), check every message per sender.
//! - `run`    — threads (one monoio runtime each), phases, CPU from /proc.
//! - `report` — the table and the JSON summary (loadgen's field names).
use clap::Parser;

mod cli;
mod client;
mod proto;
mod report;
mod run;

fn main() {
    let cfg = match cli::Args::parse().validate() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("natsref: {e:#}");
            std::process::exit(2);
        }
    };
    let (report, hist) = match run::run(&cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("natsref: {e:#}");
            std::process::exit(1);
        }
    };
    if cfg.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    if let Some(prefix) = &cfg.hgrm {
        if let Err(e) = loadgen::hgrm::write_all(prefix, &[("push", &hist)]) {
            eprintln!("natsref: {e:#}");
            std::process::exit(1);
        }
    }
    if !report.ok {
        eprintln!("natsref: FAILED: {}", report.failure_summary());
        std::process::exit(1);
    }
}
