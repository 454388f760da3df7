//! Command line and its validation. `Args` is what clap parses; `Config` is
//! the checked, resolved form every other module reads.
use crate::ack::AckPlan;
use crate::gate::Mix;
use crate::scenario::{self, Scenario};
use crate::wire::WsTarget;
use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Smallest ciphertext: the fixed-width metadata the loadgen embeds.
pub const MIN_PAYLOAD: usize = crate::wire::META_LEN;
/// Largest ciphertext we build (leaves room for the JSON around it under
/// the broker's default MAX_MESSAGE_BYTES of 65536).
pub const MAX_PAYLOAD: usize = 65_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScenarioName {
    Direct,
    Broadcast,
    Idle,
    Churn,
    Gated,
    Held,
    Peers,
}

/// The status a `gated` peer sets before the load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GateStatus {
    Working,
    Dnd,
}

impl GateStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            GateStatus::Working => "working",
            GateStatus::Dnd => "dnd",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PriorityArg {
    Now,
    Next,
    Low,
}

impl PriorityArg {
    pub fn as_str(self) -> &'static str {
        match self {
            PriorityArg::Now => "now",
            PriorityArg::Next => "next",
            PriorityArg::Low => "low",
        }
    }
}

/// Drive a running meshbroker over real WebSockets and measure it.
#[derive(Parser, Debug, Clone)]
#[command(name = "loadgen", version)]
pub struct Args {
    /// direct | broadcast | idle | churn | gated | held | peers
    #[arg(value_enum)]
    pub scenario: ScenarioName,
    /// The broker's WebSocket URL; repeat it for several brokers (one
    /// cluster): peer i of the roster connects to URL i mod their number.
    #[arg(long, default_value = "ws://127.0.0.1:7900/ws")]
    pub url: Vec<String>,
    /// Create (and afterwards remove) the run's meshes and members here.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Use existing members instead (JSON: meshes, member ids, pubkeys, secret keys).
    #[arg(long)]
    pub members: Option<PathBuf>,
    /// Drive the floor reference (`bench/floor`) instead of a broker:
    /// broadcast only; members are generated here and no database is used.
    #[arg(long)]
    pub floor: bool,
    /// Write the generated members to this file (same format as --members).
    #[arg(long)]
    pub write_members: Option<PathBuf>,
    /// Peers (members, one session each) per mesh (default 100; peers: 1000).
    #[arg(long)]
    pub peers: Option<usize>,
    /// Number of meshes.
    #[arg(long, default_value_t = 1)]
    pub meshes: usize,
    /// Ciphertext length in bytes (the loadgen's metadata included).
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Seconds of load (after every connection said hello).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after this many sends in total (whichever of count/duration comes first).
    #[arg(long)]
    pub count: Option<u64>,
    /// Open loop: total sends per second. Without it: closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Sends in flight (sent, not yet acked) per sender; closed-loop
    /// default 16, open-loop default 100000.
    #[arg(long)]
    pub window: Option<usize>,
    /// How many peers per mesh send (default: all; held: half, the rest
    /// are the offline recipients; peers: 1 broadcast sender, 0 for none).
    #[arg(long)]
    pub senders: Option<usize>,
    #[arg(long, value_enum, default_value_t = PriorityArg::Now)]
    pub priority: PriorityArg,
    /// The broker's pid (default: found from the URL's port via /proc);
    /// repeat it for several brokers: their CPU and RSS are summed
    /// (default: the listener of every --url's port).
    #[arg(long)]
    pub broker_pid: Vec<u32>,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Worker threads (default: number of cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Pin worker i to core LIST[i % len] (comma-separated core ids).
    #[arg(long)]
    pub pin_cores: Option<String>,
    /// Distinct 127.0.0.x source addresses (default: 1 per 20000 connections).
    #[arg(long)]
    pub source_addrs: Option<usize>,
    /// Seconds to wait for outstanding acks and pushes after the load stops.
    #[arg(long, default_value_t = 5.0)]
    pub grace: f64,
    /// Seconds allowed for connecting and saying hello.
    #[arg(long, default_value_t = 120.0)]
    pub setup_timeout: f64,
    /// Connections per thread in the middle of connect/upgrade/hello at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Open loop: the pacer's timer granularity in microseconds.
    #[arg(long, default_value_t = 50)]
    pub tick_us: u64,
    /// Permit a non-loopback broker address.
    #[arg(long)]
    pub allow_remote: bool,
    /// Leave the created meshes and members in the database.
    #[arg(long)]
    pub no_cleanup: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// After the run, write each non-empty latency histogram's percentile
    /// distribution (HdrHistogram's text format, ms) to PREFIX-<name>.hgrm:
    /// push, ack, hello, group-push, list, gated-drain, schedule-lag.
    #[arg(long, value_name = "PREFIX")]
    pub hgrm: Option<PathBuf>,
    /// gated: relative weights of now:next:low sends (default 1:1:1).
    #[arg(long)]
    pub mix: Option<String>,
    /// gated: peers per mesh that set themselves working (default half).
    #[arg(long)]
    pub working_peers: Option<usize>,
    /// gated: the status they set (default working; dnd is never swept).
    #[arg(long, value_enum)]
    pub gate_status: Option<GateStatus>,
    /// gated: seconds to wait after every set_status was confirmed, before
    /// the load (default 0.25).
    #[arg(long)]
    pub gate_settle: Option<f64>,
    /// gated, held: end the load once a gating (held: offline) peer has
    /// this many held sends addressed to it (default 8000; the broker holds
    /// at most 10000 per member).
    #[arg(long)]
    pub max_held_per_peer: Option<u32>,
    /// gated: also fail on held pushes delivered after an envelope of
    /// another sender that was created later (by default only reported).
    #[arg(long)]
    pub strict_order: bool,
    /// held: every N-th send of each sender goes to `*` (held for every
    /// offline member, live to the other senders); default: direct only.
    #[arg(long)]
    pub broadcast_every: Option<u64>,
    /// peers: sessions per mesh issuing list_peers (default 4; the last
    /// members of each mesh).
    #[arg(long)]
    pub listers: Option<usize>,
    /// peers: list_peers per second over all listers, paced (default 100).
    #[arg(long)]
    pub list_rate: Option<f64>,
    /// peers: every K-th member (0, K, 2K, …) joins --group after its hello
    /// (default 4).
    #[arg(long)]
    pub group_every: Option<usize>,
    /// peers: the group they join (default load/g).
    #[arg(long)]
    pub group: Option<String>,
    /// peers: where the group sends go, `@name` or `#name` reaching --group
    /// (default @load).
    #[arg(long)]
    pub group_target: Option<String>,
    /// peers: group sends per second over all meshes, one group sender per
    /// mesh (default 200; 0: none).
    #[arg(long)]
    pub group_rate: Option<f64>,
    /// Sessions ask for acknowledged delivery (PROTOCOL.md §11, hello
    /// capability `client_ack`) and ack their pushes, one `client_ack` per
    /// read (up to 1000 ids each); redeliveries are counted apart. Every
    /// scenario that sends.
    #[arg(long)]
    pub client_ack: bool,
    /// churn: connect every session with `session_hello` (PROTOCOL.md §9):
    /// its own ed25519 key, vouched for by its member's key, so each hello
    /// costs the broker two signature checks instead of one.
    #[arg(long)]
    pub session_hello: bool,
    /// With --client-ack: the share of first pushes acked, in [0, 1]
    /// (default 1), chosen by a hash of the messageId; the others come
    /// again after the broker's CLIENT_ACK_TIMEOUT_SECONDS and are acked
    /// then. Below 1 the drain also waits (up to --grace) for them.
    #[arg(long)]
    pub ack_fraction: Option<f64>,
    /// direct, broadcast: every send carries a unique `client_message_id`
    /// (PROTOCOL.md §11); an ack saying `"duplicate":true` fails the run.
    #[arg(long)]
    pub client_message_ids: bool,
    /// broadcast: the last N members of each mesh stop reading after their
    /// hello (with a 4 KiB receive buffer), so the broker cuts them off as
    /// slow readers (1013) mid-run; they never send, their pushes are not
    /// expected, and the figures are the other receivers' (default 0).
    #[arg(long)]
    pub stalled_readers: Option<usize>,
}

/// The `gated` scenario's settings.
#[derive(Clone, Debug)]
pub struct GateConfig {
    pub mix: Mix,
    pub working_peers: usize,
    pub status: GateStatus,
    pub settle: Duration,
    pub max_held_per_peer: u32,
    pub strict_order: bool,
}

/// The `held` scenario's settings.
#[derive(Clone, Debug)]
pub struct HeldConfig {
    pub broadcast_every: Option<u64>,
    pub max_held_per_peer: u32,
}

/// The `peers` scenario's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct PeersConfig {
    pub listers: usize,
    pub list_rate: f64,
    pub group_every: usize,
    /// In lowercase, as the broker compares it.
    pub group: String,
    pub group_target: String,
    pub group_rate: f64,
}

/// Where the members come from.
#[derive(Clone, Debug)]
pub enum MemberSource {
    Database(String),
    File(PathBuf),
    /// `--floor`: generated for the run, stored nowhere (the floor admits
    /// any hello).
    Generated,
}

/// A validated run configuration.
#[derive(Clone)]
pub struct Config {
    pub scenario: Arc<dyn Scenario>,
    /// `--url`s, as given (at least one).
    pub urls: Vec<String>,
    /// Their parsed targets, in the same order: see [`url_for_peer`].
    pub targets: Vec<WsTarget>,
    pub members: MemberSource,
    pub write_members: Option<PathBuf>,
    pub peers: usize,
    pub meshes: usize,
    pub payload: usize,
    pub duration: Duration,
    pub count: Option<u64>,
    pub rate: Option<f64>,
    pub window: usize,
    pub senders: Option<usize>,
    pub priority: PriorityArg,
    /// `--broker-pid`s, each once, in order (empty: find them from the
    /// URLs' ports).
    pub broker_pids: Vec<u32>,
    pub json: bool,
    pub threads: usize,
    pub pin_cores: Vec<usize>,
    pub source_addrs: Option<usize>,
    pub grace: Duration,
    pub setup_timeout: Duration,
    pub connect_concurrency: usize,
    pub tick: Duration,
    pub cleanup: bool,
    pub progress: bool,
    /// `--hgrm PREFIX`.
    pub hgrm: Option<PathBuf>,
    /// `gated` only.
    pub gate: Option<GateConfig>,
    /// `held` only.
    pub held: Option<HeldConfig>,
    /// `peers` only: the peer directory and groups.
    pub directory: Option<PeersConfig>,
    /// `--client-ack`: acknowledged delivery, and the share acked.
    pub client_ack: Option<AckPlan>,
    /// `--client-message-ids`.
    pub client_message_ids: bool,
    /// `--session-hello` (churn).
    pub session_hello: bool,
    /// `--stalled-readers` (broadcast): members per mesh that stop reading.
    pub stalled_readers: usize,
}

/// Which of `urls` URLs the roster's peer `peer` (its index over all
/// meshes) connects to: round-robin, for the whole run (a reconnecting
/// peer keeps its URL).
pub fn url_for_peer(peer: usize, urls: usize) -> usize {
    peer % urls
}

/// Each `--url` checked as [`WsTarget::parse`] does; with several, an
/// error names the one refused.
fn parse_targets(urls: &[String], allow_remote: bool) -> Result<Vec<WsTarget>> {
    if urls.is_empty() {
        bail!("give at least one --url");
    }
    urls.iter()
        .map(|url| {
            let target = WsTarget::parse(url, allow_remote);
            if urls.len() > 1 {
                target.with_context(|| format!("--url {url:?}"))
            } else {
                target
            }
        })
        .collect()
}

fn seconds(name: &str, v: f64) -> Result<Duration> {
    if !v.is_finite() || v <= 0.0 || v > 86_400.0 {
        bail!("--{name} must be a number of seconds in (0, 86400], got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

impl Args {
    /// Parse from an iterator (tests and the e2e harness).
    pub fn parse_from_iter<I, T>(args: I) -> Result<Args>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Ok(Args::try_parse_from(args)?)
    }

    pub fn validate(&self) -> Result<Config> {
        let scenario = scenario::by_name(self.scenario);
        let targets = parse_targets(&self.url, self.allow_remote)?;
        let members = match (&self.database_url, &self.members) {
            _ if self.floor => self.floor_members()?,
            (Some(_), Some(_)) => bail!("give either --database-url or --members, not both"),
            (None, None) => bail!("give --database-url (create members) or --members FILE"),
            (Some(url), None) => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    bail!("--database-url must be a postgres:// or postgresql:// URL");
                }
                MemberSource::Database(url.clone())
            }
            (None, Some(path)) => MemberSource::File(path.clone()),
        };
        if self.meshes == 0 {
            bail!("--meshes must be at least 1");
        }
        let peers = self.peers();
        let min_peers = if scenario.traffic().is_some() { 2 } else { 1 };
        if peers < min_peers {
            bail!(
                "--peers must be at least {min_peers} for {}",
                scenario.name()
            );
        }
        if peers.saturating_mul(self.meshes) > 1_000_000 {
            bail!("--peers × --meshes must be at most 1000000");
        }
        if !(MIN_PAYLOAD..=MAX_PAYLOAD).contains(&self.payload) {
            bail!("--payload must be between {MIN_PAYLOAD} and {MAX_PAYLOAD} bytes");
        }
        let duration = seconds("duration", self.duration)?;
        let grace = seconds("grace", self.grace)?;
        let setup_timeout = seconds("setup-timeout", self.setup_timeout)?;
        if let Some(rate) = self.rate {
            if !rate.is_finite() || rate <= 0.0 || rate > 1e9 {
                bail!("--rate must be a positive number of sends per second, got {rate}");
            }
            if scenario.traffic().is_none() {
                bail!("--rate applies to direct and broadcast only");
            }
        }
        if self.count == Some(0) {
            bail!("--count must be at least 1");
        }
        let window = match self.window {
            Some(0) => bail!("--window must be at least 1"),
            Some(w) => w,
            None if self.rate.is_some() => 100_000,
            None => 16,
        };
        let held = self.scenario == ScenarioName::Held;
        let listing = self.scenario == ScenarioName::Peers;
        let max_senders = if held { peers - 1 } else { peers };
        // `peers` may do without broadcast load.
        let min_senders = usize::from(!listing);
        if let Some(s) = self.senders {
            if s < min_senders || s > max_senders {
                bail!(
                    "--senders must be between {min_senders} and {max_senders} for {}",
                    scenario.name()
                );
            }
        }
        let stalled_readers = self.stalled_readers.unwrap_or(0);
        if stalled_readers > 0 {
            if self.scenario != ScenarioName::Broadcast {
                bail!("--stalled-readers applies to broadcast only");
            }
            if stalled_readers >= peers {
                bail!("--stalled-readers must be less than --peers ({peers})");
            }
            if self.senders.is_some_and(|s| s + stalled_readers > peers) {
                bail!("--senders plus --stalled-readers must be at most --peers ({peers}): stalled readers never send");
            }
        }
        let senders = match self.senders {
            None if held => Some((peers / 2).max(1)),
            None if listing => Some(1),
            None if stalled_readers > 0 => Some(peers - stalled_readers),
            s => s,
        };
        let threads = match self.threads {
            Some(0) => bail!("--threads must be at least 1"),
            Some(t) if t > 1024 => bail!("--threads must be at most 1024"),
            Some(t) => t,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        };
        let pin_cores = match &self.pin_cores {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|s| {
                    s.trim()
                        .parse::<usize>()
                        .with_context(|| format!("--pin-cores: {s:?} is not a core id"))
                })
                .collect::<Result<Vec<_>>>()?,
        };
        if let Some(n) = self.source_addrs {
            if n == 0 || n > 254 {
                bail!("--source-addrs must be between 1 and 254");
            }
            if n > 1 && !targets.iter().all(WsTarget::is_ipv4_loopback) {
                bail!("--source-addrs > 1 needs an IPv4 loopback broker address");
            }
        }
        if self.connect_concurrency == 0 {
            bail!("--connect-concurrency must be at least 1");
        }
        if self.tick_us == 0 || self.tick_us > 100_000 {
            bail!("--tick-us must be between 1 and 100000");
        }
        let gate = self.gate_config()?;
        let held = self.held_config()?;
        let directory = self.peers_config(senders.unwrap_or(peers))?;
        let client_ack = self.ack_config(scenario.as_ref())?;
        if self.session_hello && self.scenario != ScenarioName::Churn {
            bail!("--session-hello applies to churn only");
        }
        Ok(Config {
            scenario,
            urls: self.url.clone(),
            targets,
            members,
            write_members: self.write_members.clone(),
            peers,
            meshes: self.meshes,
            payload: self.payload,
            duration,
            count: self.count,
            rate: self.rate,
            window,
            senders,
            priority: self.priority,
            broker_pids: self.broker_pids(),
            json: self.json,
            threads,
            pin_cores,
            source_addrs: self.source_addrs,
            grace,
            setup_timeout,
            connect_concurrency: self.connect_concurrency,
            tick: Duration::from_micros(self.tick_us),
            cleanup: !self.no_cleanup,
            progress: !self.quiet,
            hgrm: self.hgrm_prefix()?,
            gate,
            held,
            directory,
            client_ack,
            client_message_ids: self.client_message_ids,
            session_hello: self.session_hello,
            stalled_readers,
        })
    }

    /// `--hgrm`: checked before the run, so a long run is not lost to a
    /// directory that is not there.
    fn hgrm_prefix(&self) -> Result<Option<PathBuf>> {
        let Some(prefix) = &self.hgrm else {
            return Ok(None);
        };
        if prefix.file_name().is_none() {
            bail!(
                "--hgrm {} needs a file name prefix, not a directory",
                prefix.display()
            );
        }
        let dir = prefix.parent().filter(|d| !d.as_os_str().is_empty());
        if dir.is_some_and(|d| !d.is_dir()) {
            bail!("--hgrm {}: no such directory", prefix.display());
        }
        Ok(Some(prefix.clone()))
    }

    /// `--floor`: the floor answers a hello and sends to `*`, nothing else,
    /// and keeps no members.
    fn floor_members(&self) -> Result<MemberSource> {
        if self.scenario != ScenarioName::Broadcast {
            bail!("--floor applies to broadcast only (the floor reference takes nothing but sends to *)");
        }
        if self.database_url.is_some() || self.members.is_some() {
            bail!("--floor generates its members: give neither --database-url nor --members");
        }
        if self.client_ack || self.client_message_ids {
            bail!("--floor takes neither --client-ack nor --client-message-ids (the floor has no acknowledged delivery or dedupe)");
        }
        Ok(MemberSource::Generated)
    }

    /// `--client-ack`, `--ack-fraction`, `--client-message-ids`.
    fn ack_config(&self, scenario: &dyn Scenario) -> Result<Option<AckPlan>> {
        if self.client_message_ids
            && !matches!(
                self.scenario,
                ScenarioName::Direct | ScenarioName::Broadcast
            )
        {
            bail!("--client-message-ids applies to direct and broadcast only");
        }
        if !self.client_ack {
            if self.ack_fraction.is_some() {
                bail!("--ack-fraction needs --client-ack");
            }
            return Ok(None);
        }
        if scenario.traffic().is_none() {
            bail!(
                "--client-ack applies to scenarios that send (not {})",
                scenario.name()
            );
        }
        let fraction = self.ack_fraction.unwrap_or(1.0);
        if !fraction.is_finite() || !(0.0..=1.0).contains(&fraction) {
            bail!("--ack-fraction must be a number in [0, 1], got {fraction}");
        }
        Ok(Some(AckPlan { fraction }))
    }

    /// `--broker-pid`s without repeats (a pid twice would count its CPU twice).
    fn broker_pids(&self) -> Vec<u32> {
        let mut pids = Vec::with_capacity(self.broker_pid.len());
        for &pid in &self.broker_pid {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        pids
    }

    /// `--peers`, or its default for the scenario.
    fn peers(&self) -> usize {
        match (self.peers, self.scenario) {
            (Some(n), _) => n,
            (None, ScenarioName::Peers) => 1000,
            (None, _) => 100,
        }
    }

    fn peers_config(&self, senders: usize) -> Result<Option<PeersConfig>> {
        if self.scenario != ScenarioName::Peers {
            if self.listers.is_some()
                || self.list_rate.is_some()
                || self.group_every.is_some()
                || self.group.is_some()
                || self.group_target.is_some()
                || self.group_rate.is_some()
            {
                bail!("--listers, --list-rate, --group-every, --group, --group-target and --group-rate apply to peers only");
            }
            return Ok(None);
        }
        if self.count.is_some() {
            bail!("--count does not apply to peers (its load is paced by time)");
        }
        if senders == 0 && (self.rate.is_some() || self.window.is_some()) {
            bail!("--rate and --window pace broadcast senders: give --senders 1 or more");
        }
        let listers = self.listers.unwrap_or(4);
        if listers == 0 {
            bail!("--listers must be at least 1");
        }
        let list_rate = self.list_rate.unwrap_or(100.0);
        if !list_rate.is_finite() || list_rate <= 0.0 || list_rate > 1e6 {
            bail!("--list-rate must be a number of requests per second in (0, 1000000], got {list_rate}");
        }
        let group_rate = self.group_rate.unwrap_or(200.0);
        if !group_rate.is_finite() || !(0.0..=1e6).contains(&group_rate) {
            bail!("--group-rate must be a number of sends per second in [0, 1000000], got {group_rate}");
        }
        let group_every = self.group_every.unwrap_or(4);
        if group_every == 0 {
            bail!("--group-every must be at least 1");
        }
        let group = self.group.as_deref().unwrap_or("load/g");
        let Some(group) = meshbroker::protocol::GroupName::parse(group) else {
            bail!("--group {group:?} is not a group name (PROTOCOL.md §10: up to four /-separated levels of [a-z0-9][a-z0-9_.-]{{0,63}})");
        };
        let group_target = self.group_target.as_deref().unwrap_or("@load");
        let target_name = group_target
            .strip_prefix('@')
            .or_else(|| group_target.strip_prefix('#'));
        if target_name
            .and_then(meshbroker::protocol::GroupName::parse)
            .is_none()
        {
            bail!("--group-target must be @<group> or #<group>, got {group_target:?}");
        }
        if !crate::peers::target_covers(group_target, group.as_str()) {
            bail!(
                "--group-target {group_target} does not reach members of --group {}",
                group.as_str()
            );
        }
        // Every mesh the run generates has --peers members: check the roles fit.
        crate::peers::MeshRoles::new(
            self.peers(),
            senders,
            group_rate > 0.0,
            listers,
            group_every,
        )?;
        Ok(Some(PeersConfig {
            listers,
            list_rate,
            group_every,
            group: group.as_str().to_string(),
            group_target: group_target.to_string(),
            group_rate,
        }))
    }

    fn max_held_per_peer(&self) -> Result<u32> {
        let max = self.max_held_per_peer.unwrap_or(8000);
        if max == 0 {
            bail!("--max-held-per-peer must be at least 1");
        }
        Ok(max)
    }

    fn held_config(&self) -> Result<Option<HeldConfig>> {
        if self.scenario != ScenarioName::Held {
            if self.broadcast_every.is_some() {
                bail!("--broadcast-every applies to held only");
            }
            return Ok(None);
        }
        if self.payload <= MIN_PAYLOAD {
            bail!("--payload must be more than {MIN_PAYLOAD} bytes for held (it carries a priority marker)");
        }
        if self.broadcast_every == Some(0) {
            bail!("--broadcast-every must be at least 1");
        }
        Ok(Some(HeldConfig {
            broadcast_every: self.broadcast_every,
            max_held_per_peer: self.max_held_per_peer()?,
        }))
    }

    fn gate_config(&self) -> Result<Option<GateConfig>> {
        if self.scenario != ScenarioName::Gated {
            if self.mix.is_some()
                || self.working_peers.is_some()
                || self.gate_status.is_some()
                || self.gate_settle.is_some()
                || self.strict_order
            {
                bail!("--mix, --working-peers, --gate-status, --gate-settle and --strict-order apply to gated only");
            }
            if self.max_held_per_peer.is_some() && self.scenario != ScenarioName::Held {
                bail!("--max-held-per-peer applies to gated and held only");
            }
            return Ok(None);
        }
        if self.payload <= MIN_PAYLOAD {
            bail!("--payload must be more than {MIN_PAYLOAD} bytes for gated (it carries a priority marker)");
        }
        let peers = self.peers();
        let working_peers = self.working_peers.unwrap_or(peers / 2);
        if working_peers == 0 || working_peers > peers {
            bail!("--working-peers must be between 1 and --peers ({peers})");
        }
        let max_held_per_peer = self.max_held_per_peer()?;
        Ok(Some(GateConfig {
            mix: Mix::parse(self.mix.as_deref().unwrap_or("1:1:1"))?,
            working_peers,
            status: self.gate_status.unwrap_or(GateStatus::Working),
            settle: match self.gate_settle {
                None => Duration::from_millis(250),
                Some(v) if v.is_finite() && (0.0..=60.0).contains(&v) => Duration::from_secs_f64(v),
                Some(v) => bail!("--gate-settle must be between 0 and 60 seconds, got {v}"),
            },
            max_held_per_peer,
            strict_order: self.strict_order,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(extra: &[&str]) -> Result<Config> {
        let mut argv = vec!["loadgen"];
        argv.extend_from_slice(extra);
        Args::parse_from_iter(argv)?.validate()
    }

    const DB: &str = "--database-url=postgres://u@127.0.0.1/db";

    #[test]
    fn defaults_are_valid() {
        let c = check(&["direct", DB]).unwrap();
        assert_eq!(c.peers, 100);
        assert_eq!(c.window, 16);
        assert_eq!(c.payload, 256);
        assert!(c.rate.is_none());
        assert_eq!(c.scenario.name(), "direct");
        let open = check(&["broadcast", DB, "--rate", "1000"]).unwrap();
        assert_eq!(open.window, 100_000);
    }

    #[test]
    fn member_source_is_required_and_exclusive() {
        assert!(check(&["direct"]).is_err());
        assert!(check(&["direct", DB, "--members", "/tmp/x.json"]).is_err());
        assert!(check(&["direct", "--members", "/tmp/x.json"]).is_ok());
        assert!(check(&["direct", "--database-url", "mysql://x"]).is_err());
    }

    #[test]
    fn hgrm_prefix_needs_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("run");
        let c = check(&["direct", DB, "--hgrm", prefix.to_str().unwrap()]).unwrap();
        assert_eq!(c.hgrm.as_deref(), Some(prefix.as_path()));
        assert!(check(&["direct", DB, "--hgrm", "bare-prefix"]).is_ok());
        assert!(check(&["direct", DB]).unwrap().hgrm.is_none());
        let missing = dir.path().join("nope/run");
        assert!(check(&["direct", DB, "--hgrm", missing.to_str().unwrap()]).is_err());
        assert!(check(&["direct", DB, "--hgrm", "/"]).is_err());
    }

    #[test]
    fn floor_is_broadcast_with_generated_members() {
        let c = check(&["broadcast", "--floor"]).unwrap();
        assert!(matches!(c.members, MemberSource::Generated));
        assert_eq!((c.peers, c.window), (100, 16));
        let c = check(&[
            "broadcast",
            "--floor",
            "--senders",
            "3",
            "--rate",
            "1000",
            "--broker-pid",
            "42",
            "--json",
        ])
        .unwrap();
        assert_eq!(
            (c.senders, c.rate, c.broker_pids),
            (Some(3), Some(1000.0), vec![42])
        );
        for bad in [
            &["direct", "--floor"][..],
            &["held", "--floor"],
            &["peers", "--floor"],
            &["broadcast", "--floor", DB],
            &["broadcast", "--floor", "--members", "/tmp/x.json"],
            &["broadcast", "--floor", "--client-ack"],
            &["broadcast", "--floor", "--client-message-ids"],
            &["broadcast", "--floor", "--peers", "1"],
        ] {
            assert!(check(bad).is_err(), "{bad:?} should be refused");
        }
        // Without --floor a member source stays required.
        assert!(check(&["broadcast"]).is_err());
    }

    #[test]
    fn refuses_bad_numbers() {
        for bad in [
            &["--peers", "1"][..],
            &["--meshes", "0"],
            &["--payload", "8"],
            &["--payload", "70000"],
            &["--duration", "0"],
            &["--duration", "-1"],
            &["--rate", "0"],
            &["--rate", "NaN"],
            &["--window", "0"],
            &["--threads", "0"],
            &["--count", "0"],
            &["--senders", "101"],
            &["--pin-cores", "0,x"],
            &["--source-addrs", "0"],
            &["--grace", "inf"],
        ] {
            let mut argv = vec!["direct", DB];
            argv.extend_from_slice(bad);
            assert!(check(&argv).is_err(), "{bad:?} should be refused");
        }
        // Idle needs only one peer but no rate.
        assert!(check(&["idle", DB, "--peers", "1"]).is_ok());
        assert!(check(&["idle", DB, "--rate", "10"]).is_err());
    }

    #[test]
    fn gated_options() {
        let c = check(&["gated", DB]).unwrap();
        let g = c.gate.expect("gated config");
        assert_eq!(g.working_peers, 50);
        assert_eq!(g.mix, Mix::default());
        assert_eq!(g.status, GateStatus::Working);
        assert_eq!(c.scenario.name(), "gated");
        let c = check(&[
            "gated",
            DB,
            "--peers",
            "10",
            "--working-peers",
            "3",
            "--mix",
            "0:1:1",
            "--gate-status",
            "dnd",
            "--gate-settle",
            "0",
        ])
        .unwrap();
        let g = c.gate.unwrap();
        assert_eq!((g.working_peers, g.status), (3, GateStatus::Dnd));
        assert!(g.settle.is_zero());
        for bad in [
            &["--working-peers", "0"][..],
            &["--working-peers", "101"],
            &["--mix", "1:1"],
            &["--mix", "0:0:0"],
            &["--payload", "32"],
            &["--gate-settle", "-1"],
            &["--max-held-per-peer", "0"],
        ] {
            let mut argv = vec!["gated", DB];
            argv.extend_from_slice(bad);
            assert!(check(&argv).is_err(), "{bad:?} should be refused");
        }
        // Gated options belong to gated.
        assert!(check(&["direct", DB, "--mix", "1:1:1"]).is_err());
        assert!(check(&["direct", DB, "--strict-order"]).is_err());
        assert!(
            check(&["gated", DB, "--strict-order"])
                .unwrap()
                .gate
                .unwrap()
                .strict_order
        );
        assert!(check(&["direct", DB]).unwrap().gate.is_none());
    }

    #[test]
    fn held_options() {
        let c = check(&["held", DB]).unwrap();
        let h = c.held.expect("held config");
        assert_eq!(h.broadcast_every, None);
        assert_eq!(h.max_held_per_peer, 8000);
        // Half the peers send; the others are the offline recipients.
        assert_eq!(c.senders, Some(50));
        assert_eq!(c.scenario.name(), "held");
        assert!(c.gate.is_none());
        let c = check(&[
            "held",
            DB,
            "--peers",
            "3",
            "--senders",
            "2",
            "--broadcast-every",
            "10",
            "--max-held-per-peer",
            "5",
            "--rate",
            "1000",
        ])
        .unwrap();
        let h = c.held.unwrap();
        assert_eq!((h.broadcast_every, h.max_held_per_peer), (Some(10), 5));
        assert_eq!(c.senders, Some(2));
        assert_eq!(
            check(&["held", DB, "--peers", "2"]).unwrap().senders,
            Some(1)
        );
        for bad in [
            &["--senders", "100"][..],
            &["--senders", "0"],
            &["--peers", "1"],
            &["--broadcast-every", "0"],
            &["--max-held-per-peer", "0"],
            &["--payload", "32"],
            &["--mix", "1:1:1"],
        ] {
            let mut argv = vec!["held", DB];
            argv.extend_from_slice(bad);
            assert!(check(&argv).is_err(), "{bad:?} should be refused");
        }
        // Held options belong to held (and the per-peer cap to gated too).
        assert!(check(&["direct", DB, "--broadcast-every", "2"]).is_err());
        assert!(check(&["gated", DB, "--broadcast-every", "2"]).is_err());
        assert!(check(&["direct", DB, "--max-held-per-peer", "5"]).is_err());
        assert!(check(&["gated", DB, "--max-held-per-peer", "5"]).is_ok());
        assert!(check(&["direct", DB]).unwrap().held.is_none());
        // Everywhere else --senders may be all of the peers.
        assert_eq!(
            check(&["direct", DB, "--senders", "100"]).unwrap().senders,
            Some(100)
        );
    }

    #[test]
    fn peers_options() {
        let c = check(&["peers", DB]).unwrap();
        let p = c.directory.clone().expect("peers config");
        assert_eq!(c.scenario.name(), "peers");
        assert_eq!(c.peers, 1000);
        assert_eq!(c.senders, Some(1));
        assert_eq!(c.window, 16);
        assert_eq!(
            p,
            PeersConfig {
                listers: 4,
                list_rate: 100.0,
                group_every: 4,
                group: "load/g".into(),
                group_target: "@load".into(),
                group_rate: 200.0,
            }
        );
        assert!(c.gate.is_none() && c.held.is_none());
        assert!(check(&["direct", DB]).unwrap().directory.is_none());
        let c = check(&[
            "peers",
            DB,
            "--peers",
            "50",
            "--senders",
            "0",
            "--listers",
            "2",
            "--list-rate",
            "1000",
            "--group-every",
            "1",
            "--group",
            "Eng/Backend",
            "--group-target",
            "#eng",
            "--group-rate",
            "0",
        ])
        .unwrap();
        let p = c.directory.unwrap();
        assert_eq!((c.peers, c.senders), (50, Some(0)));
        assert_eq!((p.listers, p.list_rate, p.group_every), (2, 1000.0, 1));
        assert_eq!(
            (p.group.as_str(), p.group_target.as_str()),
            ("eng/backend", "#eng")
        );
        assert_eq!(p.group_rate, 0.0);
        // Broadcast load as the other scenarios have it.
        let c = check(&["peers", DB, "--senders", "3", "--rate", "500"]).unwrap();
        assert_eq!(
            (c.senders, c.rate, c.window),
            (Some(3), Some(500.0), 100_000)
        );
        for bad in [
            &["--listers", "0"][..],
            &["--list-rate", "0"],
            &["--list-rate", "inf"],
            &["--group-rate", "-1"],
            &["--group-rate", "NaN"],
            &["--group-every", "0"],
            &["--group", "Load//g"],
            &["--group", "_x"],
            &["--group-target", "load"],
            &["--group-target", "@"],
            &["--group-target", "@other"],
            &["--group-target", "@load/g/x"],
            &["--count", "10"],
            &["--senders", "1001"],
            // 1 sender + the group sender + the listers must fit in the mesh.
            &["--peers", "5", "--listers", "4"],
            &["--peers", "5", "--senders", "5"],
            // Nobody in the group but the group sender.
            &[
                "--peers",
                "3",
                "--senders",
                "0",
                "--listers",
                "1",
                "--group-every",
                "4",
            ],
            &["--senders", "0", "--rate", "100"],
        ] {
            let mut argv = vec!["peers", DB];
            argv.extend_from_slice(bad);
            assert!(check(&argv).is_err(), "{bad:?} should be refused");
        }
        // Fits without the group sender.
        assert!(check(&[
            "peers",
            DB,
            "--peers",
            "5",
            "--listers",
            "4",
            "--group-rate",
            "0"
        ])
        .is_ok());
        // Peers options belong to peers.
        for other in [
            &["--listers", "2"][..],
            &["--list-rate", "10"],
            &["--group-every", "2"],
            &["--group", "x"],
            &["--group-target", "@x"],
            &["--group-rate", "1"],
        ] {
            let mut argv = vec!["broadcast", DB];
            argv.extend_from_slice(other);
            assert!(check(&argv).is_err(), "{other:?} belongs to peers");
        }
        // Elsewhere --senders 0 stays refused.
        assert!(check(&["broadcast", DB, "--senders", "0"]).is_err());
    }

    #[test]
    fn session_hello_is_for_churn() {
        assert!(!check(&["churn", DB]).unwrap().session_hello);
        assert!(
            check(&["churn", DB, "--session-hello"])
                .unwrap()
                .session_hello
        );
        assert!(check(&["direct", DB, "--session-hello"]).is_err());
    }

    #[test]
    fn stalled_readers_belong_to_broadcast_and_never_send() {
        assert_eq!(check(&["broadcast", DB]).unwrap().stalled_readers, 0);
        let c = check(&["broadcast", DB, "--peers", "10", "--stalled-readers", "1"]).unwrap();
        assert_eq!((c.stalled_readers, c.senders), (1, Some(9)));
        let c = check(&[
            "broadcast",
            DB,
            "--peers",
            "10",
            "--stalled-readers",
            "2",
            "--senders",
            "3",
        ])
        .unwrap();
        assert_eq!((c.stalled_readers, c.senders), (2, Some(3)));
        for bad in [
            &["broadcast", DB, "--peers", "10", "--stalled-readers", "10"][..],
            &[
                "broadcast",
                DB,
                "--peers",
                "10",
                "--stalled-readers",
                "2",
                "--senders",
                "9",
            ],
            &["direct", DB, "--stalled-readers", "1"],
        ] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn client_ack_options() {
        let c = check(&["direct", DB]).unwrap();
        assert!(c.client_ack.is_none() && !c.client_message_ids);
        let c = check(&["direct", DB, "--client-ack"]).unwrap();
        assert_eq!(c.client_ack, Some(AckPlan { fraction: 1.0 }));
        let c = check(&["broadcast", DB, "--client-ack", "--ack-fraction", "0.9"]).unwrap();
        assert_eq!(c.client_ack, Some(AckPlan { fraction: 0.9 }));
        for scenario in ["gated", "held", "peers"] {
            assert!(
                check(&[scenario, DB, "--client-ack", "--ack-fraction", "0"]).is_ok(),
                "{scenario}"
            );
        }
        let c = check(&["broadcast", DB, "--client-message-ids"]).unwrap();
        assert!(c.client_message_ids && c.client_ack.is_none());
        assert!(
            check(&["direct", DB, "--client-message-ids", "--client-ack"])
                .unwrap()
                .client_message_ids
        );
        for bad in [
            &["direct", "--ack-fraction", "0.5"][..],
            &["direct", "--client-ack", "--ack-fraction", "1.5"],
            &["direct", "--client-ack", "--ack-fraction", "-0.1"],
            &["direct", "--client-ack", "--ack-fraction", "NaN"],
            &["idle", "--client-ack"],
            &["churn", "--client-ack"],
            &["gated", "--client-message-ids"],
            &["held", "--client-message-ids"],
            &["peers", "--client-message-ids"],
            &["idle", "--client-message-ids"],
        ] {
            let mut argv = bad.to_vec();
            argv.insert(1, DB);
            assert!(check(&argv).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn several_urls() {
        let c = check(&["direct", DB]).unwrap();
        assert_eq!(c.urls, ["ws://127.0.0.1:7900/ws"]);
        assert_eq!(c.targets.len(), 1);
        let c = check(&[
            "held",
            DB,
            "--url",
            "ws://127.0.0.1:7901/ws",
            "--url",
            "ws://127.0.0.1:7902/other",
            "--url=ws://[::1]:7903/ws",
        ])
        .unwrap();
        assert_eq!(
            c.urls,
            [
                "ws://127.0.0.1:7901/ws",
                "ws://127.0.0.1:7902/other",
                "ws://[::1]:7903/ws"
            ]
        );
        let ports: Vec<u16> = c.targets.iter().map(|t| t.addr.port()).collect();
        assert_eq!(ports, [7901, 7902, 7903]);
        assert_eq!(c.targets[1].path, "/other");
        // The same URL twice is allowed (the peers share one broker).
        let same = ["--url", "ws://127.0.0.1:7901/ws"];
        let argv = [&["churn", DB][..], &same, &same].concat();
        assert_eq!(check(&argv).unwrap().targets.len(), 2);
        // Several 127.0.0.x sources need every URL on IPv4 loopback.
        let mut argv = vec!["idle", DB, "--source-addrs", "4"];
        argv.extend([
            "--url",
            "ws://127.0.0.1:7901/ws",
            "--url",
            "ws://127.0.0.1:7902/ws",
        ]);
        assert!(check(&argv).is_ok());
        argv.extend(["--url", "ws://[::1]:7903/ws"]);
        assert!(check(&argv).is_err());
    }

    #[test]
    fn one_bad_url_among_several_is_named() {
        let good = "ws://127.0.0.1:7901/ws";
        for (bad, why) in [
            ("ws://10.1.2.3:7900/ws", "not a loopback address"),
            ("http://127.0.0.1:7900/ws", "must start with ws://"),
            ("wss://127.0.0.1:7900/ws", "wss is not supported"),
            ("ws:///ws", "has no host"),
        ] {
            let err = check(&["direct", DB, "--url", good, "--url", bad, "--url", good])
                .err()
                .unwrap_or_else(|| panic!("{bad} should be refused"));
            let text = format!("{err:#}");
            assert!(text.contains(&format!("{bad:?}")), "{text}");
            assert!(text.contains(why), "{text}");
            // Alone, the error is the one a single --url always had.
            let alone = check(&["direct", DB, "--url", bad]).err().unwrap();
            let single = WsTarget::parse(bad, false).err().unwrap();
            assert_eq!(format!("{alone:#}"), format!("{single:#}"));
        }
        // --allow-remote covers every URL.
        assert!(check(&[
            "direct",
            DB,
            "--url",
            good,
            "--url",
            "ws://10.1.2.3:7900/ws",
            "--allow-remote"
        ])
        .is_ok());
    }

    #[test]
    fn broker_pids_repeat() {
        assert!(check(&["direct", DB]).unwrap().broker_pids.is_empty());
        let c = check(&["direct", DB, "--broker-pid", "7"]).unwrap();
        assert_eq!(c.broker_pids, [7]);
        let c = check(&[
            "direct",
            DB,
            "--broker-pid",
            "7",
            "--broker-pid=9",
            "--broker-pid",
            "7",
        ])
        .unwrap();
        assert_eq!(c.broker_pids, [7, 9]);
        assert!(check(&["direct", DB, "--broker-pid", "x"]).is_err());
    }

    #[test]
    fn peers_are_dealt_round_robin_over_the_urls() {
        let dealt: Vec<usize> = (0..7).map(|i| url_for_peer(i, 3)).collect();
        assert_eq!(dealt, [0, 1, 2, 0, 1, 2, 0]);
        assert!((0..100).all(|i| url_for_peer(i, 1) == 0));
        // Over meshes too: the index is the roster's, not the member's.
        let per_url = (0..2 * 5).fold([0; 4], |mut n, i| {
            n[url_for_peer(i, 4)] += 1;
            n
        });
        assert_eq!(per_url, [3, 3, 2, 2]);
    }

    #[test]
    fn refuses_remote_and_odd_urls() {
        assert!(check(&["direct", DB, "--url", "ws://10.1.2.3:7900/ws"]).is_err());
        assert!(check(&[
            "direct",
            DB,
            "--url",
            "ws://10.1.2.3:7900/ws",
            "--allow-remote"
        ])
        .is_ok());
        assert!(check(&["direct", DB, "--url", "http://127.0.0.1:7900/ws"]).is_err());
        assert!(check(&["direct", DB, "--url", "wss://127.0.0.1:7900/ws"]).is_err());
        assert!(check(&["direct", DB, "--url", "ws://localhost:7900/ws"]).is_ok());
        assert!(check(&["direct", DB, "--url", "ws://[::1]:7900/ws"]).is_ok());
        assert!(check(&[
            "direct",
            DB,
            "--url",
            "ws://[::1]:7900/ws",
            "--source-addrs",
            "4"
        ])
        .is_err());
    }
}
