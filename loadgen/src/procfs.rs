//! The broker's cost from /proc, and the loadgen's own CPU time.
use std::time::Duration;

/// One reading of a process's CPU time (utime + stime) and RSS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcSample {
    pub cpu: Duration,
    pub rss_bytes: u64,
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf with a valid name has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

fn page_size() -> u64 {
    // SAFETY: as above.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Parses /proc/PID/stat: fields after the `(comm)`; utime is field 14,
/// stime 15, rss (pages) 24.
pub fn parse_stat(stat: &str, ticks: u64, page: u64) -> Option<ProcSample> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let cpu_ticks = field(14)? + field(15)?;
    Some(ProcSample {
        cpu: Duration::from_nanos(cpu_ticks * 1_000_000_000 / ticks),
        rss_bytes: field(24)? * page,
    })
}

pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat, ticks_per_second(), page_size())
}

/// The sum of several processes' samples (a cluster of brokers); `None`
/// if there are none or any one is missing, so a sum never passes for
/// all of them when it is not.
pub fn sum(samples: impl IntoIterator<Item = Option<ProcSample>>) -> Option<ProcSample> {
    let mut total: Option<ProcSample> = None;
    for s in samples {
        let s = s?;
        total = Some(match total {
            None => s,
            Some(t) => ProcSample {
                cpu: t.cpu + s.cpu,
                rss_bytes: t.rss_bytes + s.rss_bytes,
            },
        });
    }
    total
}

/// [`sample`] of each of `pids`, summed as [`sum`] does.
pub fn sample_all(pids: &[u32]) -> Option<ProcSample> {
    sum(pids.iter().map(|&pid| sample(pid)))
}

/// Inodes of sockets listening on `port` in a /proc/net/tcp{,6} table.
pub fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f.get(1)?;
            let local_port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (local_port == port && *f.get(3)? == "0A").then(|| f.get(9)?.parse().ok())?
        })
        .collect()
}

/// The pid that holds a socket listening on `port`.
pub fn find_listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            inodes.extend(listening_inodes(&text, port));
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                if wanted.iter().any(|w| link.as_os_str() == w.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// The loadgen's own user + system CPU time.
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Raise RLIMIT_NOFILE to its hard limit; returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: get/setrlimit on a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let stat = "4242 (mesh broker) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 3 0 100 123456789 2560 18446744073709551615";
        let s = parse_stat(stat, 100, 4096).unwrap();
        assert_eq!(s.cpu, Duration::from_secs(3));
        assert_eq!(s.rss_bytes, 2560 * 4096);
    }

    #[test]
    fn finds_listening_inode() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1EDC 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5555 1 0 100 0 0 10 0\n   1: 0100007F:1EDC 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 6666 1 0 100 0 0 10 0\n";
        assert_eq!(listening_inodes(table, 0x1EDC), vec![5555]);
        assert!(listening_inodes(table, 80).is_empty());
    }

    #[test]
    fn sums_samples_of_several_processes() {
        let s = |ms, rss| {
            Some(ProcSample {
                cpu: Duration::from_millis(ms),
                rss_bytes: rss,
            })
        };
        assert_eq!(sum([s(1500, 10)]), s(1500, 10));
        assert_eq!(sum([s(1500, 10), s(250, 5), s(0, 1)]), s(1750, 16));
        assert_eq!(sum([s(1500, 10), None]), None);
        assert_eq!(sum([]), None);
        assert!(sample_all(&[]).is_none());
        let me = std::process::id();
        assert!(sample_all(&[me, me]).unwrap().rss_bytes > 0);
        assert!(sample_all(&[me, u32::MAX]).is_none());
    }

    #[test]
    fn own_process_is_readable() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0);
    }
}
