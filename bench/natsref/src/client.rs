//! One client: connects, subscribes to the run's subject, then publishes in
//! a closed loop (at most `window` publishes awaiting their PONG) and checks
//! every message it receives: per sender, none lost, none twice, in order.
use crate::cli::Config;
use crate::proto::{self, Frame, ProtoError};
use crate::run::{Phase, Shared};
use loadgen::stats::{mono_ns, Latency, SeqSet};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering::Release;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// Bytes at the start of every payload: sender index (u32), sequence number
/// (u32), CLOCK_MONOTONIC send time in ns (u64), little-endian; filler after.
pub(crate) const BODY_HEADER: usize = 16;

/// The one subscription id each client uses.
const SID: &str = "1";

/// How long an idle client waits between looks at the phase.
const IDLE_POLL: Duration = Duration::from_millis(1);

fn write_header(body: &mut [u8], sender: u32, seq: u32, sent_ns: u64) {
    body[..4].copy_from_slice(&sender.to_le_bytes());
    body[4..8].copy_from_slice(&seq.to_le_bytes());
    body[8..16].copy_from_slice(&sent_ns.to_le_bytes());
}

fn read_header(body: &[u8]) -> Option<(u32, u32, u64)> {
    let h = body.get(..BODY_HEADER)?;
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    Some((
        u32_at(0),
        u32_at(4),
        u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")),
    ))
}

#[derive(Debug, Error)]
pub(crate) enum ClientError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("server said -ERR {0}")]
    Server(String),
    #[error("server closed the connection")]
    Closed,
    #[error("PONG without a PING")]
    StrayPong,
}

/// One client's counts, summed over clients by the runner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub sent: u64,
    pub acked: u64,
    /// Distinct (sender, seq) messages received.
    pub pushes: u64,
    pub duplicates: u64,
    /// Received after a later message of the same sender.
    pub order_violations: u64,
    /// Not one of the run's publishes from another client: malformed, of
    /// the wrong size or sid, from an unknown sender, or the client's own.
    pub unexpected: u64,
}

impl Tally {
    pub(crate) fn add(&mut self, o: &Tally) {
        self.sent += o.sent;
        self.acked += o.acked;
        self.pushes += o.pushes;
        self.duplicates += o.duplicates;
        self.order_violations += o.order_violations;
        self.unexpected += o.unexpected;
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Seen {
    New,
    /// New, but after a higher sequence number of its sender.
    Late,
    Duplicate,
}

#[derive(Default)]
struct FromSender {
    seen: SeqSet,
    /// One past the highest sequence number seen.
    next: u32,
    unique: u64,
}

/// What one receiver got from each sender.
struct Ledger {
    from: Vec<FromSender>,
}

impl Ledger {
    fn new(peers: usize) -> Ledger {
        Ledger {
            from: (0..peers).map(|_| FromSender::default()).collect(),
        }
    }

    fn record(&mut self, sender: usize, seq: u32) -> Seen {
        let f = &mut self.from[sender];
        if !f.seen.insert(seq) {
            return Seen::Duplicate;
        }
        f.unique += 1;
        if seq >= f.next {
            f.next = seq + 1;
            Seen::New
        } else {
            Seen::Late
        }
    }

    /// Every other sender has stopped, and all it published is here
    /// (sequence numbers are dense from 0, so the count says it).
    fn complete(&self, me: usize, shared: &Shared) -> bool {
        self.from
            .iter()
            .enumerate()
            .all(|(j, f)| j == me || shared.final_sent(j).is_some_and(|sent| f.unique >= sent))
    }
}

/// The socket and what has been read but not yet parsed.
struct Conn {
    stream: TcpStream,
    rbuf: Vec<u8>,
    start: usize,
}

impl Conn {
    async fn write(&mut self, out: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        let (res, out) = self.stream.write_all(out).await;
        res?;
        Ok(out)
    }

    /// Reads once more onto the end of the unparsed bytes.
    async fn fill(&mut self) -> Result<(), ClientError> {
        if self.start > 0 {
            self.rbuf.drain(..self.start);
            self.start = 0;
        }
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(self.rbuf.capacity());
        }
        let len = self.rbuf.len();
        let buf = std::mem::take(&mut self.rbuf);
        let (res, slice) = self.stream.read(buf.slice_mut(len..)).await;
        self.rbuf = slice.into_inner();
        match res? {
            0 => Err(ClientError::Closed),
            _ => Ok(()),
        }
    }
}

struct Client {
    me: usize,
    cfg: Rc<Config>,
    shared: Arc<Shared>,
    hist: Rc<RefCell<Latency>>,
    ledger: Ledger,
    tally: Tally,
    /// PUB+PING pairs written whose PONG has not come.
    inflight: usize,
    /// A bare PING (setup, or the drain's wake-up) awaits its PONG.
    poll_pending: bool,
    /// Server PINGs to answer in the next write.
    pongs_owed: usize,
    /// The last read brought messages.
    got_msgs: bool,
    pub_line: Vec<u8>,
    body: Vec<u8>,
}

/// Runs client `me` until the runner says stop, and returns its counts; an
/// error ends it early and is reported to the runner as the run's failure.
pub(crate) async fn run(
    me: usize,
    cfg: Rc<Config>,
    shared: Arc<Shared>,
    hist: Rc<RefCell<Latency>>,
) -> Tally {
    let subject = shared.subject.clone();
    let mut c = Client {
        me,
        ledger: Ledger::new(cfg.peers),
        tally: Tally::default(),
        inflight: 0,
        poll_pending: false,
        pongs_owed: 0,
        got_msgs: false,
        pub_line: proto::pub_line(&subject, cfg.payload).into_bytes(),
        body: vec![b'.'; cfg.payload],
        cfg,
        shared,
        hist,
    };
    if let Err(e) = c.drive(&subject).await {
        c.shared.fail(format!("client {me}: {e}"));
    }
    c.tally
}

impl Client {
    async fn drive(&mut self, subject: &str) -> Result<(), ClientError> {
        let stream = TcpStream::connect(self.cfg.addr)
            .await
            .map_err(ClientError::Connect)?;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            stream,
            rbuf: Vec::with_capacity(64 * 1024),
            start: 0,
        };
        let name = format!("natsref-{}", self.me);
        let hello = [proto::connect(&name), proto::sub(subject, SID)].concat();
        let mut out = [hello.as_bytes(), proto::PING].concat();
        // The PONG says the SUB is in place before anyone publishes.
        self.poll_pending = true;
        out = conn.write(out).await?;
        while self.poll_pending {
            self.read(&mut conn).await?;
        }
        self.shared.ready.fetch_add(1, Release);
        while self.shared.phase() == Phase::Setup {
            monoio::time::sleep(IDLE_POLL).await;
        }

        let mut sending = true;
        loop {
            let phase = self.shared.phase();
            if phase == Phase::Stop {
                return Ok(());
            }
            out.clear();
            for _ in 0..std::mem::take(&mut self.pongs_owed) {
                out.extend_from_slice(proto::PONG);
            }
            if phase == Phase::Run {
                let now = mono_ns();
                while self.inflight < self.cfg.window {
                    self.publish(&mut out, now);
                }
            } else if sending {
                sending = false;
                self.shared.set_final_sent(self.me, self.tally.sent);
            }
            let mut drained = false;
            if !sending && self.inflight == 0 {
                drained = self.ledger.complete(self.me, &self.shared);
                if !drained && !self.poll_pending {
                    // Nothing of ours is in flight, so no read would return:
                    // a PING makes the next one come back, even if the
                    // missing messages never do.
                    if !self.got_msgs {
                        monoio::time::sleep(IDLE_POLL).await;
                    }
                    out.extend_from_slice(proto::PING);
                    self.poll_pending = true;
                }
            }
            if !out.is_empty() {
                out = conn.write(out).await?;
            }
            if drained {
                self.shared.drained.fetch_add(1, Release);
                // Connected (and counted) until the runner has measured.
                while self.shared.phase() != Phase::Stop {
                    monoio::time::sleep(IDLE_POLL).await;
                }
                return Ok(());
            }
            self.read(&mut conn).await?;
        }
    }

    fn publish(&mut self, out: &mut Vec<u8>, now: u64) {
        let seq = u32::try_from(self.tally.sent).expect("fewer than 2^32 publishes per client");
        write_header(&mut self.body, self.me as u32, seq, now);
        out.extend_from_slice(&self.pub_line);
        out.extend_from_slice(&self.body);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(proto::PING);
        self.tally.sent += 1;
        self.inflight += 1;
    }

    /// One read, and every whole frame in the buffer handled.
    async fn read(&mut self, conn: &mut Conn) -> Result<(), ClientError> {
        conn.fill().await?;
        let now = mono_ns();
        self.got_msgs = false;
        let hist = self.hist.clone();
        let mut hist = hist.borrow_mut();
        while let Some((frame, n)) = proto::parse_frame(&conn.rbuf[conn.start..])? {
            self.on_frame(frame, now, &mut hist)?;
            conn.start += n;
        }
        Ok(())
    }

    fn on_frame(
        &mut self,
        frame: Frame<'_>,
        now: u64,
        hist: &mut Latency,
    ) -> Result<(), ClientError> {
        match frame {
            Frame::Msg { sid, payload } => {
                self.got_msgs = true;
                self.on_msg(sid, payload, now, hist);
            }
            // PONGs come in the order of the PINGs, and a bare PING is only
            // sent with no publish in flight.
            Frame::Pong if self.inflight > 0 => {
                self.inflight -= 1;
                self.tally.acked += 1;
            }
            Frame::Pong if self.poll_pending => self.poll_pending = false,
            Frame::Pong => return Err(ClientError::StrayPong),
            Frame::Ping => self.pongs_owed += 1,
            Frame::Info | Frame::Ok => {}
            Frame::Err(e) => return Err(ClientError::Server(e)),
        }
        Ok(())
    }

    fn on_msg(&mut self, sid: &[u8], payload: &[u8], now: u64, hist: &mut Latency) {
        let header = read_header(payload)
            .filter(|_| sid == SID.as_bytes() && payload.len() == self.cfg.payload)
            .filter(|&(sender, _, _)| {
                (sender as usize) < self.cfg.peers && sender as usize != self.me
            });
        let Some((sender, seq, sent_ns)) = header else {
            self.tally.unexpected += 1;
            return;
        };
        match self.ledger.record(sender as usize, seq) {
            Seen::Duplicate => {
                self.tally.duplicates += 1;
                return;
            }
            Seen::Late => self.tally.order_violations += 1,
            Seen::New => {}
        }
        self.tally.pushes += 1;
        hist.record_since(sent_ns, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let mut body = vec![b'.'; 32];
        write_header(&mut body, 7, 0x0102_0304, u64::MAX - 1);
        assert_eq!(read_header(&body), Some((7, 0x0102_0304, u64::MAX - 1)));
        assert_eq!(&body[BODY_HEADER..], &[b'.'; 16]);
        assert_eq!(read_header(&body[..15]), None);
    }

    #[test]
    fn ledger_sees_duplicates_and_late_arrivals() {
        let mut l = Ledger::new(3);
        assert_eq!(l.record(1, 0), Seen::New);
        assert_eq!(l.record(1, 2), Seen::New);
        assert_eq!(l.record(1, 1), Seen::Late);
        assert_eq!(l.record(1, 2), Seen::Duplicate);
        assert_eq!(l.record(2, 0), Seen::New);
        let shared = Shared::new(3, "s".into());
        assert!(!l.complete(0, &shared), "senders still open");
        shared.set_final_sent(1, 3);
        shared.set_final_sent(2, 2);
        assert!(!l.complete(0, &shared), "sender 2's seq 1 missing");
        assert_eq!(l.record(2, 1), Seen::New);
        assert!(l.complete(0, &shared));
        assert!(!l.complete(1, &shared), "sender 0 still open");
    }
}
