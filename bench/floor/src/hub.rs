//! One thread: its listener, its subscribers per mesh, and the batches it
//! exchanges with the other threads — the broker's shard inbox shape: a
//! bounded crossbeam channel of batches plus a waker (monoio wakes a parked
//! io_uring thread through its eventfd), one batch per destination per
//! event-loop turn, drained a bounded number of batches per wakeup.
use crate::conn::{self, Conn};
use atomic_waker::AtomicWaker;
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

/// Inbox capacity in batches; a full inbox keeps the batch on the sender.
const INBOX_BATCHES: usize = 4096;
/// Batches handled per wakeup before the sockets get their turn.
const INBOX_DRAIN: usize = 64;

/// A push for another thread's subscribers of `mesh`.
pub(crate) struct Remote {
    mesh: Arc<str>,
    frame: Bytes,
}

/// One thread's inbox: what the others send it, and the waker they wake.
pub(crate) struct Lane {
    tx: Sender<Vec<Remote>>,
    rx: Receiver<Vec<Remote>>,
    waker: AtomicWaker,
}

/// Every thread's lane, shared by all of them.
pub(crate) fn lanes(threads: usize) -> Arc<[Lane]> {
    (0..threads)
        .map(|_| {
            let (tx, rx) = crossbeam_channel::bounded(INBOX_BATCHES);
            let waker = AtomicWaker::new();
            Lane { tx, rx, waker }
        })
        .collect()
}

impl Lane {
    /// Never blocks: a full inbox hands the batch back.
    fn send(&self, batch: Vec<Remote>) -> Result<(), Vec<Remote>> {
        let sent = self.tx.try_send(batch).map_err(|e| e.into_inner());
        self.waker.wake();
        sent
    }

    /// Waits for batches, then moves up to `INBOX_DRAIN` of them into `out`.
    async fn next(&self, out: &mut Vec<Vec<Remote>>) {
        poll_fn(|cx| {
            if self.drain(out) {
                return Poll::Ready(());
            }
            // Register, then look again: a batch sent in between would
            // otherwise wait for the next one.
            self.waker.register(cx.waker());
            if self.drain(out) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    fn drain(&self, out: &mut Vec<Vec<Remote>>) -> bool {
        while out.len() < INBOX_DRAIN {
            match self.rx.try_recv() {
                Ok(batch) => out.push(batch),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        !out.is_empty()
    }
}

pub(crate) struct Hub {
    pub(crate) index: usize,
    /// This thread's subscribers, by mesh id.
    meshes: RefCell<HashMap<Arc<str>, Vec<Rc<Conn>>>>,
    lanes: Arc<[Lane]>,
    /// Pushes gathered this turn, per destination thread.
    outgoing: RefCell<Vec<Vec<Remote>>>,
    flusher: Cell<Option<Waker>>,
    next_conn: Cell<u64>,
    next_message: Cell<u64>,
}

/// No connection: a remote push excludes nobody here.
const NOBODY: u64 = u64::MAX;

impl Hub {
    pub(crate) fn conn_id(&self) -> u64 {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        id
    }

    /// A `messageId` unique across threads: thread and counter in hex.
    pub(crate) fn message_id(&self) -> [u8; 16] {
        let n = self.next_message.get();
        self.next_message.set(n + 1);
        let mut id = [0; 16];
        crate::push::put_hex(&mut id, (self.index as u64) << 48 | n);
        id
    }

    pub(crate) fn subscribe(&self, mesh: &Arc<str>, conn: &Rc<Conn>) {
        let mut meshes = self.meshes.borrow_mut();
        meshes.entry(mesh.clone()).or_default().push(conn.clone());
    }

    pub(crate) fn unsubscribe(&self, mesh: &str, conn: u64) {
        let mut meshes = self.meshes.borrow_mut();
        if let Some(list) = meshes.get_mut(mesh) {
            list.retain(|c| c.id != conn);
            if list.is_empty() {
                meshes.remove(mesh);
            }
        }
    }

    /// Queues `frame` on every subscriber of `mesh` but `sender`, here and
    /// (in this turn's batches) on every other thread, which keeps no
    /// table of where a mesh's subscribers are.
    pub(crate) fn broadcast(&self, mesh: &Arc<str>, frame: &Bytes, sender: u64) {
        self.deliver(mesh, frame, sender);
        let mut outgoing = self.outgoing.borrow_mut();
        for (dest, batch) in outgoing.iter_mut().enumerate() {
            if dest != self.index {
                batch.push(Remote {
                    mesh: mesh.clone(),
                    frame: frame.clone(),
                });
            }
        }
        if let Some(flusher) = self.flusher.take() {
            flusher.wake();
        }
    }

    fn deliver(&self, mesh: &str, frame: &Bytes, except: u64) {
        if let Some(list) = self.meshes.borrow().get(mesh) {
            for conn in list.iter().filter(|c| c.id != except) {
                conn.queue(frame.clone());
            }
        }
    }
}

/// Lets every other runnable task run once, so a whole turn's work is
/// gathered before it is sent (monoio has no `yield_now`).
pub(crate) async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if std::mem::replace(&mut yielded, true) {
            return Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

pub(crate) async fn run(index: usize, listener: std::net::TcpListener, lanes: Arc<[Lane]>) {
    let hub = Rc::new(Hub {
        index,
        meshes: RefCell::default(),
        outgoing: RefCell::new(lanes.iter().map(|_| Vec::new()).collect()),
        lanes,
        flusher: Cell::new(None),
        next_conn: Cell::new(0),
        next_message: Cell::new(0),
    });
    let listener = monoio::net::TcpListener::from_std(listener).expect("listener");
    monoio::spawn(inbox_loop(hub.clone()));
    monoio::spawn(flush_loop(hub.clone()));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                monoio::spawn(conn::serve(hub.clone(), stream));
            }
            // Out of descriptors, most likely: let some close.
            Err(_) => monoio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn inbox_loop(hub: Rc<Hub>) {
    let mut batches = Vec::with_capacity(INBOX_DRAIN);
    loop {
        hub.lanes[hub.index].next(&mut batches).await;
        for batch in batches.drain(..) {
            for remote in batch {
                hub.deliver(&remote.mesh, &remote.frame, NOBODY);
            }
        }
        // The sockets written to by these batches run before the next ones.
        yield_now().await;
    }
}

/// Sends what this turn gathered for the other threads, one batch each; a
/// full inbox keeps its batch here for a retry shortly after.
async fn flush_loop(hub: Rc<Hub>) {
    loop {
        poll_fn(|cx| {
            if hub.outgoing.borrow().iter().any(|b| !b.is_empty()) {
                return Poll::Ready(());
            }
            hub.flusher.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        yield_now().await;
        let mut blocked = false;
        for (dest, lane) in hub.lanes.iter().enumerate() {
            let batch = std::mem::take(&mut hub.outgoing.borrow_mut()[dest]);
            if batch.is_empty() {
                continue;
            }
            if let Err(batch) = lane.send(batch) {
                let mut outgoing = hub.outgoing.borrow_mut();
                let newer = std::mem::replace(&mut outgoing[dest], batch);
                outgoing[dest].extend(newer);
                blocked = true;
            }
        }
        if blocked {
            monoio::time::sleep(Duration::from_micros(200)).await;
        }
    }
}
