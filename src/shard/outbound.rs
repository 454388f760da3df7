//! A connection's outbound queue: encoded frames waiting for the socket.
//!
//! Routing pushes shared envelopes (one encoded frame for every recipient)
//! and the connection's writer task takes everything queued in one go and
//! writes it with one syscall, so a burst of pushes costs one write per socket
//! per wakeup. The queue is bounded in bytes: a peer that stops reading is cut
//! off (close 1013), never buffered without limit.
use crate::mesh::{Envelope, Orphan};
use crate::protocol::Priority;
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

/// For acks and pushes: when the send that caused the frame was read, so the
/// writer can record send→ack and send→push latency once the frame is out.
#[derive(Clone, Copy)]
pub struct Stamp {
    pub sent_at: Instant,
    pub priority: Priority,
    pub kind: StampKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum StampKind {
    Ack,
    Push,
}

/// A frame waiting for the socket: a routed envelope's push (kept as the
/// envelope, so a session that is cut off can hand it back to its member),
/// or a frame the session answers with.
pub enum QueuedFrame {
    Push {
        envelope: Arc<Envelope>,
        stored: bool,
        /// See `Orphan::shared`.
        shared: bool,
        /// Pushed again after a lapsed lease (its `redelivered` frame).
        redelivered: bool,
    },
    Reply {
        frame: Bytes,
        stamp: Option<Stamp>,
    },
}

impl QueuedFrame {
    fn bytes(&self) -> &Bytes {
        match self {
            QueuedFrame::Push {
                envelope,
                redelivered,
                ..
            } => envelope.push_frame(*redelivered),
            QueuedFrame::Reply { frame, .. } => frame,
        }
    }

    fn stamp(&self) -> Option<Stamp> {
        match self {
            QueuedFrame::Push { envelope, .. } => (!envelope.restored).then_some(Stamp {
                sent_at: envelope.sent_at,
                priority: envelope.priority,
                kind: StampKind::Push,
            }),
            QueuedFrame::Reply { stamp, .. } => *stamp,
        }
    }
}

/// The envelopes among frames that will not be written.
fn orphans_of(frames: impl Iterator<Item = QueuedFrame>) -> Vec<Orphan> {
    frames
        .filter_map(|queued| match queued {
            QueuedFrame::Push {
                envelope,
                stored,
                shared,
                ..
            } => Some(Orphan {
                envelope,
                stored,
                shared,
            }),
            QueuedFrame::Reply { .. } => None,
        })
        .collect()
}

#[derive(Debug, PartialEq, Eq)]
pub struct Overflow;

/// Most iovecs one writev takes (Linux's IOV_MAX).
const MAX_IOVECS: usize = 1024;

/// Frames taken for one write, with the iovecs that point into them. The
/// frames are owned here while the kernel reads them, so no copy is needed.
#[derive(Default)]
pub struct FrameBatch {
    frames: Vec<QueuedFrame>,
    iovecs: Vec<libc::iovec>,
    /// First iovec not yet fully written.
    written: usize,
}

impl FrameBatch {
    /// Accounts for a (possibly partial) write of `n` bytes; true once the
    /// whole batch is out. (monoio 0.2.4's `write_vectored_all` does not
    /// advance a partly written iovec's base, which corrupts the stream on
    /// a short write, so the broker keeps this bookkeeping itself.)
    pub fn advance(&mut self, mut n: usize) -> bool {
        while let Some(iovec) = self.iovecs.get_mut(self.written) {
            if n < iovec.iov_len {
                // SAFETY: n < iov_len, so the pointer stays inside the frame.
                iovec.iov_base = unsafe { iovec.iov_base.cast::<u8>().add(n) }.cast();
                iovec.iov_len -= n;
                return false;
            }
            n -= iovec.iov_len;
            self.written += 1;
        }
        true
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Empties a batch whose write failed: its envelopes, which may not
    /// have reached the peer.
    pub fn unwritten(&mut self) -> Vec<Orphan> {
        self.iovecs.clear();
        self.written = 0;
        orphans_of(self.frames.drain(..))
    }

    /// Empties the batch (after its write): each frame's latency stamp,
    /// and each envelope `written` must hear of: those held for this
    /// session's member (now delivered), and with `leasing` every push (a
    /// `client_ack` session leases them), with whether it was held.
    pub fn finish(
        &mut self,
        mut stamp: impl FnMut(Stamp),
        leasing: bool,
        mut written: impl FnMut(Arc<Envelope>, bool),
    ) {
        self.iovecs.clear();
        self.written = 0;
        for queued in self.frames.drain(..) {
            if let Some(s) = queued.stamp() {
                stamp(s);
            }
            if let QueuedFrame::Push {
                envelope, stored, ..
            } = queued
            {
                if stored || leasing {
                    written(envelope, stored);
                }
            }
        }
    }
}

// SAFETY: `iovecs` point into the frames held in `frames`, which neither
// move nor change while the runtime owns the batch; the vectors are only
// touched by `take_now`, `advance` and `drain_stamps`, never during a write.
unsafe impl monoio::buf::IoVecBuf for FrameBatch {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iovecs[self.written..].as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iovecs.len() - self.written
    }
}

pub struct Outbound {
    queue: RefCell<VecDeque<QueuedFrame>>,
    queued_bytes: Cell<usize>,
    limit: usize,
    writer: Cell<Option<Waker>>,
    /// Set once a close frame is queued: nothing is queued after it.
    closing: Cell<bool>,
}

impl Outbound {
    pub fn new(limit: usize) -> Self {
        Outbound {
            queue: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            limit,
            writer: Cell::new(None),
            closing: Cell::new(false),
        }
    }

    /// Queue a frame this session answers with. Over the byte bound nothing
    /// is queued and the caller must cut the connection off.
    pub fn push(&self, frame: Bytes, stamp: Option<Stamp>) -> Result<(), Overflow> {
        self.enqueue(QueuedFrame::Reply { frame, stamp })
    }

    /// Queue a routed envelope's push (same bound); `stored` as in
    /// `Orphan`; `redelivered` for one a lapsed lease put back.
    pub fn push_envelope(
        &self,
        envelope: &Arc<Envelope>,
        stored: bool,
        shared: bool,
        redelivered: bool,
    ) -> Result<(), Overflow> {
        self.enqueue(QueuedFrame::Push {
            envelope: envelope.clone(),
            stored,
            shared,
            redelivered,
        })
    }

    /// Queue a reply that may be larger than the byte bound by itself (a
    /// `peers_list` of a very large mesh): taken when it fits, or when
    /// nothing else is queued, so a session holds at most one such reply
    /// past its bound. `Overflow` leaves the session as it was.
    pub fn push_large(&self, frame: Bytes) -> Result<(), Overflow> {
        if self.queued_bytes.get() == 0 {
            return self.enqueue_unbounded(QueuedFrame::Reply { frame, stamp: None });
        }
        self.push(frame, None)
    }

    fn enqueue(&self, queued: QueuedFrame) -> Result<(), Overflow> {
        if self.queued_bytes.get() + queued.bytes().len() > self.limit && !self.closing.get() {
            return Err(Overflow);
        }
        self.enqueue_unbounded(queued)
    }

    fn enqueue_unbounded(&self, queued: QueuedFrame) -> Result<(), Overflow> {
        if self.closing.get() {
            return Ok(());
        }
        let bytes = self.queued_bytes.get() + queued.bytes().len();
        self.queued_bytes.set(bytes);
        self.queue.borrow_mut().push_back(queued);
        self.wake_writer();
        Ok(())
    }

    /// Queue a close frame as the last frame. With `discard_pending`, frames
    /// not yet handed to the socket are dropped first (the peer is too slow
    /// to deserve them); otherwise they go out before the close.
    /// Returns the envelopes discarded, oldest first.
    pub fn close(&self, close_frame: Bytes, discard_pending: bool) -> Vec<Orphan> {
        if self.closing.replace(true) {
            return Vec::new();
        }
        let mut queue = self.queue.borrow_mut();
        let mut discarded = Vec::new();
        if discard_pending {
            discarded = orphans_of(queue.drain(..));
            self.queued_bytes.set(0);
        }
        self.queued_bytes
            .set(self.queued_bytes.get() + close_frame.len());
        queue.push_back(QueuedFrame::Reply {
            frame: close_frame,
            stamp: None,
        });
        drop(queue);
        self.wake_writer();
        discarded
    }

    /// Stop without a close frame (the peer is gone): the writer ends.
    /// Returns the envelopes that were never written.
    pub fn abort(&self) -> Vec<Orphan> {
        self.closing.set(true);
        let orphans = orphans_of(self.queue.borrow_mut().drain(..));
        self.queued_bytes.set(0);
        self.wake_writer();
        orphans
    }

    pub fn is_closing(&self) -> bool {
        self.closing.get()
    }

    /// Bytes that can still be queued before the bound.
    pub fn room(&self) -> usize {
        self.limit.saturating_sub(self.queued_bytes.get())
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.get()
    }

    /// Waits until frames are queued. Returns false when the queue is
    /// closed and fully drained: the writer is done.
    pub async fn wait_ready(&self) -> bool {
        poll_fn(|cx| {
            if !self.queue.borrow().is_empty() {
                return Poll::Ready(true);
            }
            if self.closing.get() {
                return Poll::Ready(false);
            }
            self.writer.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await
    }

    /// Moves queued frames into `batch`, at most what one writev takes.
    pub fn take_now(&self, batch: &mut FrameBatch) {
        let mut queue = self.queue.borrow_mut();
        let take = queue.len().min(MAX_IOVECS - batch.frames.len());
        let mut bytes = 0;
        for queued in queue.drain(..take) {
            let frame = queued.bytes();
            bytes += frame.len();
            batch.iovecs.push(libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            });
            batch.frames.push(queued);
        }
        self.queued_bytes.set(self.queued_bytes.get() - bytes);
    }

    fn wake_writer(&self) {
        if let Some(waker) = self.writer.take() {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_is_inclusive_and_close_discards() {
        let out = Outbound::new(10);
        assert!(out.push(Bytes::from_static(b"12345"), None).is_ok());
        assert!(out.push(Bytes::from_static(b"12345"), None).is_ok());
        assert_eq!(out.push(Bytes::from_static(b"1"), None), Err(Overflow));
        assert!(out.close(Bytes::from_static(b"cl"), true).is_empty());
        assert_eq!(out.queued_bytes(), 2);
        // Nothing is queued after the close frame.
        assert!(out.push(Bytes::from_static(b"x"), None).is_ok());
        assert_eq!(out.queued_bytes(), 2);
        let mut batch = FrameBatch::default();
        out.take_now(&mut batch);
        assert_eq!(batch.len(), 1);
        assert_eq!(out.queued_bytes(), 0);
    }

    #[test]
    fn a_large_reply_goes_alone_past_the_bound() {
        let out = Outbound::new(10);
        let large = Bytes::from_static(b"0123456789abcdef");
        assert_eq!(out.push(large.clone(), None), Err(Overflow));
        assert!(out.push_large(large.clone()).is_ok());
        assert_eq!(out.queued_bytes(), 16);
        // Not a second one, and nothing else past the bound.
        assert_eq!(out.push_large(large), Err(Overflow));
        assert_eq!(out.push(Bytes::from_static(b"x"), None), Err(Overflow));
        let mut batch = FrameBatch::default();
        out.take_now(&mut batch);
        assert!(out.push_large(Bytes::from_static(b"small")).is_ok());
    }

    #[test]
    fn short_writes_advance_into_the_right_frame() {
        let out = Outbound::new(1024);
        out.push(Bytes::from_static(b"abc"), None).unwrap();
        out.push(Bytes::from_static(b"defgh"), None).unwrap();
        let mut batch = FrameBatch::default();
        out.take_now(&mut batch);
        let pending = |b: &FrameBatch| -> Vec<u8> {
            use monoio::buf::IoVecBuf;
            let iovecs =
                unsafe { std::slice::from_raw_parts(b.read_iovec_ptr(), b.read_iovec_len()) };
            iovecs
                .iter()
                .flat_map(|v| unsafe {
                    std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                })
                .copied()
                .collect()
        };
        assert!(!batch.advance(2));
        assert_eq!(pending(&batch), b"cdefgh");
        assert!(!batch.advance(3));
        assert_eq!(pending(&batch), b"fgh");
        assert!(batch.advance(3));
        let mut stamps = 0;
        batch.finish(|_| stamps += 1, false, |_, _| {});
        assert_eq!(stamps, 0);
        assert!(batch.is_empty());
    }
}
