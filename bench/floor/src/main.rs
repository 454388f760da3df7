//! floor: the floor reference for the broker's cost per broadcast push
//! (issue 14). A bare WebSocket fan-out server in the broker's shape — one
//! pinned monoio (io_uring) thread per core, each with its own SO_REUSEPORT
//! listener; pushes for another thread's sockets cross in batches on a
//! crossbeam channel with an eventfd wakeup; each socket's queued frames go
//! out in one writev — doing only what `loadgen broadcast --floor` needs:
//! the upgrade, a `hello` naming a mesh (answered with a `hello_ack`), and
//! sends to `*`, each acked and its push encoded once and queued on every
//! other subscriber of the mesh. What the broker spends per push above this,
//! measured in the same session, is its routing, parsing and bookkeeping.
//!
//! Left out on purpose: signatures, members and any database, statuses and
//! gating, held envelopes, direct and group targets (answered
//! `unsupported_target`), rate limits, metrics, pings and timeouts, graceful
//! shutdown (it runs until killed). A reader 16 MiB behind is cut off
//! without a close frame.
//!
//! - `hub`  — one thread: its listener, its subscribers per mesh, the
//!   batches to and from the other threads.
//! - `conn` — one socket: upgrade, frames, hello, and its write queue.
//! - `push` — the send's fields found by key, the ack and push written.
mod conn;
mod hub;
mod push;

use socket2::{Domain, Protocol, Socket, Type};
use std::net::{IpAddr, SocketAddr};

const USAGE: &str = "usage: floor --port P [--host 127.0.0.1] [--threads N]";

struct Args {
    addr: SocketAddr,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut host = IpAddr::from([127, 0, 0, 1]);
    let mut port = None;
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--host" => host = value()?.parse().map_err(|e| format!("--host: {e}"))?,
            "--port" => port = Some(value()?.parse().map_err(|e| format!("--port: {e}"))?),
            "--threads" => {
                threads = value()?
                    .parse()
                    .ok()
                    .filter(|&n| (1..=1024).contains(&n))
                    .ok_or("--threads must be between 1 and 1024")?
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let port = port.ok_or("--port is required")?;
    Ok(Args {
        addr: SocketAddr::new(host, port),
        threads,
    })
}

/// One SO_REUSEPORT listener per thread, as the broker binds them: a plain
/// bind first, so a second server on the port fails instead of sharing it.
fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let socket = |addr: SocketAddr| {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        Ok::<_, std::io::Error>(s)
    };
    if addr.port() != 0 {
        socket(addr)?.bind(&addr.into())?;
    }
    let mut addr = addr;
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        let s = socket(addr)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(4096)?;
        let listener: std::net::TcpListener = s.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("floor: {e}\n{USAGE}");
        std::process::exit(2);
    });
    let listeners = bind(args.addr, args.threads).unwrap_or_else(|e| {
        eprintln!("floor: cannot listen on {}: {e}", args.addr);
        std::process::exit(1);
    });
    let local = listeners[0].local_addr().expect("bound listener");
    // A dead thread would silently drop its share of every mesh.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::exit(1);
    }));
    let lanes = hub::lanes(args.threads);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let threads: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(index, listener)| {
            let lanes = lanes.clone();
            let core = (!cores.is_empty()).then(|| cores[index % cores.len()]);
            std::thread::Builder::new()
                .name(format!("floor-{index}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    let mut runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                        .with_entries(4096)
                        .enable_timer()
                        .build()
                        .expect("monoio runtime");
                    runtime.block_on(hub::run(index, listener, lanes));
                })
                .expect("spawn thread")
        })
        .collect();
    eprintln!("floor listening on {local}");
    for thread in threads {
        let _ = thread.join();
    }
}
