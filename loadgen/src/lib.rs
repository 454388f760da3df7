//! loadgen: drives a running meshbroker over real WebSockets, speaking only
//! the public protocol (PROTOCOL.md §4), and reports throughput, latency,
//! delivery correctness and the broker's own CPU and memory cost.
//!
//! # Layout
//! - `cli`      — command line, validation into a [`cli::Config`].
//! - `roster`   — meshes and members with ed25519 keys: generated or loaded
//!   from `--members FILE`; signed hello frames.
//! - `db`       — creates and removes the run's meshes and members in Postgres.
//! - `wire`     — URL/target checks, the HTTP upgrade, server frame parsing,
//!   pre-built send frames and the cheap classification of incoming messages.
//! - `stats`    — HdrHistogram latency recording, the open-loop pacer
//!   (coordinated-omission correction), loss and duplicate accounting.
//! - `worker`   — one thread's event loop (mio/epoll, many connections,
//!   batched writes).
//! - `scenario` — `direct`, `broadcast`, `idle`, `churn`, `gated`, `held`,
//!   `peers`, one module each, behind the [`scenario::Scenario`] trait so
//!   later ones plug in.
//! - `gate`     — the `gated` scenario's accounting: who gates, the
//!   priority mix, gating violations, the held-order check.
//! - `held`     — the `held` scenario's accounting: offline recipients,
//!   what each send owes whom, the exactly-once check by `messageId`.
//! - `peers`    — the `peers` scenario's roles (broadcast senders, group
//!   sender, listers, group members), `list_peers` matched to their answers
//!   by `_reqId`, and the reading and check of a `peers_list`.
//! - `ack`      — acknowledged delivery from the client's side
//!   (`--client-ack`): the ack fraction, batched `client_ack` messages,
//!   redeliveries told apart from new pushes and true duplicates.
//! - `procfs`   — the broker's CPU time and RSS from /proc, pid from a port.
//! - `report`   — the final table and the JSON summary.
//! - `hgrm`     — `--hgrm`: the latency histograms' percentile distributions
//!   in HdrHistogram's text format.
//! - `run`      — ties it together: setup, phases, progress, teardown.
pub mod ack;
pub mod cli;
pub mod db;
pub mod gate;
pub mod held;
pub mod hgrm;
pub mod peers;
pub mod procfs;
pub mod report;
pub mod roster;
pub mod run;
pub mod scenario;
pub mod stats;
pub mod wire;
pub mod worker;

pub use cli::{Args, Config};
pub use report::Report;
pub use run::run;
