//! What the accept loop does when `accept` fails, above all when the
//! process is out of file descriptors (EMFILE/ENFILE).
//!
//! Out of descriptors, the pending connection stays in the listen backlog
//! and every retry fails again at once: retrying without a pause spins a
//! core, and logging each failure floods the log. So an *episode* of
//! failures is logged twice (its first error, and its end with how many
//! there were; it ends with the first accept that succeeds [`QUIET`] after
//! its last failure, so a table hovering at its limit, where descriptors
//! come and go, stays one episode), every failure is counted
//! (`broker_accept_errors_total`),
//! and each shard keeps one spare descriptor: out of descriptors, it gives
//! the spare back to the kernel, accepts the waiting connection with it,
//! closes that at once (the client sees its connection end instead of
//! hanging in the backlog) and takes the spare again. Only when even that
//! fails (another thread took the freed slot) does the loop pause.
use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// The pause after a failure the spare descriptor could not clear.
pub(super) const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// An episode of failures ends with a success this long after its last one.
pub(super) const QUIET: Duration = Duration::from_secs(1);

/// What the loop should do after a failed accept.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AfterError {
    /// A waiting connection was shed: accept again at once.
    Retry,
    /// Pause for [`ACCEPT_BACKOFF`] before accepting again.
    Pause,
}

/// One shard's accept-failure state.
pub(super) struct AcceptErrors {
    shard: usize,
    /// `/dev/null`, held open so that one descriptor can be freed on EMFILE.
    spare: Option<File>,
    /// Failures in the current episode (0: no episode).
    failures: u64,
    /// When the episode's last failure happened.
    last_failure: Option<Instant>,
    /// Connections shed with the spare descriptor in this episode.
    shed: u64,
}

fn out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

fn open_spare() -> Option<File> {
    File::open("/dev/null").ok()
}

impl AcceptErrors {
    pub(super) fn new(shard: usize) -> Self {
        AcceptErrors {
            shard,
            spare: open_spare(),
            failures: 0,
            last_failure: None,
            shed: 0,
        }
    }

    /// An accept failed with `e` on the listener `listener`.
    pub(super) fn failed(&mut self, e: &io::Error, listener: RawFd) -> AfterError {
        self.failures += 1;
        self.last_failure = Some(Instant::now());
        if self.failures == 1 {
            tracing::warn!(target: "shard", shard = self.shard, error = %e,
                out_of_fds = out_of_fds(e), "accept failed");
        }
        if !out_of_fds(e) {
            return AfterError::Pause;
        }
        // Give the spare back, take the waiting connection with it, end
        // that connection, and take the spare again.
        let Some(spare) = self.spare.take() else {
            self.spare = open_spare();
            return AfterError::Pause;
        };
        drop(spare);
        // SAFETY: accept4 on our own listening socket, with no address
        // buffers; the listener is non-blocking, so it never waits.
        let fd = unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        let shed = fd >= 0;
        if shed {
            // SAFETY: `fd` was just returned by accept4 and is ours alone.
            unsafe {
                libc::close(fd);
            }
            self.shed += 1;
        }
        self.spare = open_spare();
        if shed && self.spare.is_some() {
            AfterError::Retry
        } else {
            AfterError::Pause
        }
    }

    /// An accept succeeded: a failure episode, if any, is over once it has
    /// been quiet for [`QUIET`].
    pub(super) fn succeeded(&mut self) {
        if self.failures == 0 || self.last_failure.is_some_and(|t| t.elapsed() < QUIET) {
            return;
        }
        tracing::info!(target: "shard", shard = self.shard, failures = self.failures,
            shed = self.shed, "accept recovered");
        self.failures = 0;
        self.shed = 0;
        if self.spare.is_none() {
            self.spare = open_spare();
        }
    }

    /// The spare descriptor, for tests.
    #[cfg(test)]
    fn spare_fd(&self) -> Option<RawFd> {
        self.spare.as_ref().map(std::os::fd::AsRawFd::as_raw_fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn out_of_fds_sheds_the_waiting_connection_with_the_spare() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut errors = AcceptErrors::new(0);
        assert!(errors.spare_fd().is_some());
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(
            errors.failed(&emfile, listener.as_raw_fd()),
            AfterError::Retry
        );
        assert!(errors.spare_fd().is_some(), "the spare is taken again");
        // The shed client sees its connection end.
        use std::io::Read;
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 1];
        assert!(matches!(client.read(&mut buf), Ok(0) | Err(_)));
        // Nothing else waits: the next failure pauses.
        assert_eq!(
            errors.failed(&emfile, listener.as_raw_fd()),
            AfterError::Pause
        );
        assert_eq!((errors.failures, errors.shed), (2, 1));
        // A success right after a failure does not end the episode...
        errors.succeeded();
        assert_eq!((errors.failures, errors.shed), (2, 1));
        // ...one after a quiet spell does.
        errors.last_failure = Some(Instant::now() - QUIET);
        errors.succeeded();
        assert_eq!((errors.failures, errors.shed), (0, 0));
    }

    #[test]
    fn other_errors_pause() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut errors = AcceptErrors::new(0);
        let other = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(
            errors.failed(&other, listener.as_raw_fd()),
            AfterError::Pause
        );
    }
}
