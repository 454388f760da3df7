//! Command line, validated into a [`Config`] (every bad value reported at once).
use crate::client::BODY_HEADER;
use anyhow::{anyhow, bail, Context};
use clap::Parser;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// nats-server's default max_payload.
const MAX_PAYLOAD: usize = 1024 * 1024;

/// Broadcast load against a nats-server: every peer subscribes to one
/// subject and publishes to it; each publish reaches the other peers.
#[derive(Parser, Debug)]
#[command(name = "natsref", version)]
pub(crate) struct Args {
    /// The server, nats://HOST:PORT.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// Clients; each subscribes to the run's subject and publishes to it.
    #[arg(long, default_value_t = 100)]
    peers: usize,
    /// Payload bytes per publish (sender, sequence, timestamp, filler).
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Publishes per client awaiting their PONG (closed loop).
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Seconds of load (after every client subscribed).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait for the last messages after the load stops.
    #[arg(long, default_value_t = 5.0)]
    grace: f64,
    /// Threads (default: number of cores).
    #[arg(long)]
    threads: Option<usize>,
    /// The server's pid, for its CPU time (default: found from the port).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Write the push latency histogram to PREFIX-push.hgrm (loadgen's writer).
    #[arg(long, value_name = "PREFIX")]
    hgrm: Option<String>,
}

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub addr: SocketAddr,
    pub peers: usize,
    pub payload: usize,
    pub window: usize,
    pub duration: Duration,
    pub grace: Duration,
    pub threads: usize,
    pub server_pid: Option<u32>,
    pub json: bool,
    /// The prefix: `PREFIX-push.hgrm` is written.
    pub hgrm: Option<PathBuf>,
}

impl Args {
    pub(crate) fn validate(self) -> anyhow::Result<Config> {
        let mut errors = Vec::new();
        let addr = parse_url(&self.url)
            .map_err(|e| errors.push(format!("--url {:?}: {e:#}", self.url)))
            .ok();
        if self.peers < 2 {
            errors.push(format!("--peers {}: at least 2", self.peers));
        }
        if !(BODY_HEADER..=MAX_PAYLOAD).contains(&self.payload) {
            errors.push(format!(
                "--payload {}: {BODY_HEADER} to {MAX_PAYLOAD} bytes",
                self.payload
            ));
        }
        if self.window == 0 {
            errors.push("--window 0: at least 1".into());
        }
        let seconds = |name: &str, v: f64, errors: &mut Vec<String>| {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .unwrap_or_else(|| {
                    errors.push(format!("--{name} {v}: a positive number of seconds"));
                    Duration::ZERO
                })
        };
        let duration = seconds("duration", self.duration, &mut errors);
        let grace = seconds("grace", self.grace, &mut errors);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = self.threads.unwrap_or(cores);
        if threads == 0 {
            errors.push("--threads 0: at least 1".into());
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("; "));
        }
        Ok(Config {
            addr: addr.expect("checked above"),
            peers: self.peers,
            payload: self.payload,
            window: self.window,
            duration,
            grace,
            threads: threads.min(self.peers),
            server_pid: self.server_pid,
            json: self.json,
            hgrm: self.hgrm.map(PathBuf::from),
        })
    }
}

/// `nats://HOST:PORT` (scheme and port optional, 4222 by default).
fn parse_url(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = match url.split_once("://") {
        Some(("nats", rest)) => rest,
        Some((scheme, _)) => bail!("scheme {scheme}: only nats:// (no TLS)"),
        None => url,
    };
    let host_port = rest.trim_end_matches('/');
    if host_port.contains(['/', '@']) {
        bail!("expected HOST:PORT, no path or credentials");
    }
    let has_port = host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
    let with_port = if has_port && !host_port.ends_with(']') {
        host_port.to_string()
    } else {
        format!("{host_port}:4222")
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving {with_port}"))?
        .next()
        .ok_or_else(|| anyhow!("{with_port} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Config> {
        Args::try_parse_from(std::iter::once("natsref").chain(args.iter().copied()))?.validate()
    }

    #[test]
    fn defaults_and_url() {
        let c = parse(&["--url", "nats://127.0.0.1:14222", "--threads", "500"]).unwrap();
        assert_eq!(c.addr, "127.0.0.1:14222".parse().unwrap());
        assert_eq!((c.peers, c.payload, c.window), (100, 256, 16));
        assert_eq!(c.threads, 100, "never more threads than peers");
        assert_eq!(c.hgrm, None);
        let c = parse(&["--url", "127.0.0.1", "--hgrm", "/tmp/x"]).unwrap();
        assert_eq!(c.addr.port(), 4222);
        assert_eq!(c.hgrm, Some(PathBuf::from("/tmp/x")));
    }

    #[test]
    fn reports_every_bad_value() {
        let e = parse(&[
            "--url",
            "tls://h:1",
            "--peers",
            "1",
            "--payload",
            "8",
            "--window",
            "0",
            "--duration=-1",
        ])
        .unwrap_err()
        .to_string();
        for what in [
            "--url",
            "--peers 1",
            "--payload 8",
            "--window 0",
            "--duration -1",
        ] {
            assert!(e.contains(what), "{what} missing from {e}");
        }
    }
}
