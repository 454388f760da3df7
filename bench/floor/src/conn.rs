//! One socket: the HTTP upgrade, the client frames (the broker's own codec
//! and message assembler), the hello, and a bounded write queue whose
//! writer task sends everything queued since its last write in one writev.
use crate::hub::{yield_now, Hub};
use crate::push::{self, Answer};
use bytes::Bytes;
use meshbroker::ws::{self, Incoming, MessageAssembler, OpCode};
use monoio::buf::{IoBufMut, IoVecBuf};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::tcp::{TcpOwnedReadHalf, TcpOwnedWriteHalf};
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

/// A reader this far behind is cut off, so it cannot grow the process.
const MAX_QUEUED: usize = 16 << 20;
/// The broker's default `MAX_MESSAGE_BYTES`.
const MAX_MESSAGE: usize = 64 * 1024;
const READ_SIZE: usize = 16 * 1024;
const MAX_HEAD: usize = 8 * 1024;
/// Linux's IOV_MAX: most frames one writev takes.
const MAX_IOVECS: usize = 1024;
const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

pub(crate) struct Conn {
    pub(crate) id: u64,
    fd: RawFd,
    queue: RefCell<VecDeque<Bytes>>,
    queued: Cell<usize>,
    /// Nothing more is queued: a close frame is last, or it was cut off.
    closing: Cell<bool>,
    writer: Cell<Option<Waker>>,
}

impl Conn {
    /// Queues a frame for the writer; past the bound the connection is cut.
    pub(crate) fn queue(&self, frame: Bytes) {
        if self.closing.get() {
            return;
        }
        let queued = self.queued.get() + frame.len();
        if queued > MAX_QUEUED {
            return self.cut();
        }
        self.queued.set(queued);
        self.queue.borrow_mut().push_back(frame);
        self.wake_writer();
    }

    /// Queues the close frame: the writer ends after it.
    fn queue_last(&self, frame: Bytes) {
        self.queue(frame);
        self.closing.set(true);
    }

    /// Drops what is queued and shuts the socket, which ends both tasks.
    fn cut(&self) {
        self.closing.set(true);
        self.queue.borrow_mut().clear();
        self.queued.set(0);
        // SAFETY: shutdown(2) on the socket this connection owns; an error
        // (already disconnected) changes nothing.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        self.wake_writer();
    }

    fn wake_writer(&self) {
        if let Some(waker) = self.writer.take() {
            waker.wake();
        }
    }

    /// Waits for queued frames; false once closing with nothing left.
    async fn wait_ready(&self) -> bool {
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
}

/// Frames handed to one writev, owned here while the kernel reads them.
#[derive(Default)]
struct Batch {
    frames: Vec<Bytes>,
    iovecs: Vec<libc::iovec>,
    written: usize,
}

impl Batch {
    fn take(&mut self, conn: &Conn) {
        let mut queue = conn.queue.borrow_mut();
        let n = queue.len().min(MAX_IOVECS);
        for frame in queue.drain(..n) {
            conn.queued.set(conn.queued.get() - frame.len());
            self.iovecs.push(libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            });
            self.frames.push(frame);
        }
    }

    /// Accounts for a write of `n` bytes; true once all of it is out.
    fn advance(&mut self, mut n: usize) -> bool {
        while let Some(iovec) = self.iovecs.get_mut(self.written) {
            if n < iovec.iov_len {
                // SAFETY: n < iov_len: the pointer stays inside its frame.
                iovec.iov_base = unsafe { iovec.iov_base.cast::<u8>().add(n) }.cast();
                iovec.iov_len -= n;
                return false;
            }
            n -= iovec.iov_len;
            self.written += 1;
        }
        true
    }

    fn clear(&mut self) {
        self.frames.clear();
        self.iovecs.clear();
        self.written = 0;
    }
}

// SAFETY: the iovecs point into `frames`, whose bytes neither move nor
// change while the runtime owns the batch.
unsafe impl IoVecBuf for Batch {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iovecs[self.written..].as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iovecs.len() - self.written
    }
}

async fn write_loop(mut writer: TcpOwnedWriteHalf, conn: Rc<Conn>) {
    let mut batch = Batch::default();
    while conn.wait_ready().await {
        // Whatever else this turn queues goes out in the same write.
        yield_now().await;
        batch.take(&conn);
        while !batch.frames.is_empty() {
            let (result, returned) = writer.writev(batch).await;
            batch = returned;
            match result {
                Ok(n) if n > 0 && !batch.advance(n) => {}
                Ok(n) if n > 0 => batch.clear(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ => return conn.cut(),
            }
        }
    }
    let _ = writer.shutdown().await;
}

/// Appends what the socket has; false on EOF or error.
async fn fill(reader: &mut TcpOwnedReadHalf, buf: &mut Vec<u8>) -> bool {
    if buf.capacity() - buf.len() < READ_SIZE / 2 {
        buf.reserve(READ_SIZE);
    }
    let (len, cap) = (buf.len(), buf.capacity());
    let (result, slice) = reader.read(std::mem::take(buf).slice_mut(len..cap)).await;
    *buf = slice.into_inner();
    matches!(result, Ok(n) if n > 0)
}

/// Reads the request head and answers it: `101` for a WebSocket upgrade
/// with a valid key, `400` otherwise. `buf` keeps what came after the head.
async fn upgrade(
    reader: &mut TcpOwnedReadHalf,
    writer: &mut TcpOwnedWriteHalf,
    buf: &mut Vec<u8>,
) -> bool {
    let head_len = loop {
        if let Some(at) = memchr::memmem::find(buf, b"\r\n\r\n") {
            break at + 4;
        }
        if buf.len() > MAX_HEAD || !fill(reader, buf).await {
            return false;
        }
    };
    let response = std::str::from_utf8(&buf[..head_len])
        .ok()
        .and_then(|head| {
            head.split("\r\n")
                .filter_map(|line| line.split_once(':'))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-key"))
        })
        .map(|(_, key)| key.trim())
        .filter(|key| ws::is_valid_client_key(key))
        .map(ws::switching_protocols_response);
    buf.drain(..head_len);
    let upgraded = response.is_some();
    let (result, _) = writer
        .write_all(response.unwrap_or_else(|| BAD_REQUEST.to_vec()))
        .await;
    result.is_ok() && upgraded
}

#[derive(serde::Deserialize)]
struct Hello {
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "meshId")]
    mesh_id: String,
    #[serde(rename = "memberId")]
    member_id: String,
    pubkey: String,
}

/// A subscriber's mesh and what its pushes say of it.
struct Joined {
    mesh: Arc<str>,
    sender: Box<[u8]>,
}

pub(crate) async fn serve(hub: Rc<Hub>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let conn = Rc::new(Conn {
        id: hub.conn_id(),
        fd: stream.as_raw_fd(),
        queue: RefCell::default(),
        queued: Cell::new(0),
        closing: Cell::new(false),
        writer: Cell::new(None),
    });
    let (mut reader, mut writer) = stream.into_split();
    let mut buf = Vec::with_capacity(READ_SIZE);
    if !upgrade(&mut reader, &mut writer, &mut buf).await {
        return;
    }
    monoio::spawn(write_loop(writer, conn.clone()));
    let mut assembler = MessageAssembler::new(MAX_MESSAGE);
    let mut joined = None;
    // Why reading ends: the close code to answer with, or None (peer gone).
    let close = 'read: loop {
        let mut at = 0;
        loop {
            let header = match ws::decode_client_frame(&mut buf[at..], MAX_MESSAGE) {
                Ok(Some(header)) => header,
                Ok(None) => break,
                Err(e) => break 'read Some(e.close_code()),
            };
            let range = header.payload_range();
            let payload = &buf[at + range.start..at + range.end];
            at += range.end;
            match assembler.push(&header, payload) {
                Ok(None | Some(Incoming::Pong(_))) => {}
                Ok(Some(Incoming::Text(message) | Incoming::Binary(message))) => {
                    process(&hub, &conn, &mut joined, message)
                }
                Ok(Some(Incoming::Ping(data))) => {
                    conn.queue(ws::encode_server_frame(OpCode::Pong, data))
                }
                Ok(Some(Incoming::Close(code))) => break 'read Some(code.unwrap_or(1000)),
                Err(e) => break 'read Some(e.close_code()),
            }
        }
        buf.drain(..at);
        if !fill(&mut reader, &mut buf).await {
            break None;
        }
    };
    match close {
        Some(code) => conn.queue_last(ws::close_frame(code, "")),
        None => conn.cut(),
    }
    if let Some(joined) = joined {
        hub.unsubscribe(&joined.mesh, conn.id);
    }
}

/// The first message must be a hello (anything else is answered
/// `no_hello`); every later one is a send.
fn process(hub: &Hub, conn: &Rc<Conn>, joined: &mut Option<Joined>, message: &[u8]) {
    if let Some(j) = joined {
        match push::answer(message, &hub.message_id(), &j.sender) {
            Answer::Broadcast { ack, push } => {
                conn.queue(ack);
                hub.broadcast(&j.mesh, &push, conn.id);
            }
            Answer::Refused(error) => conn.queue(error),
        }
        return;
    }
    let hello = serde_json::from_slice::<Hello>(message).ok();
    let Some(hello) = hello.filter(|h| h.kind == "hello") else {
        return conn.queue(push::error("no_hello", "say hello first", None));
    };
    let ack = serde_json::json!({
        "type": "hello_ack",
        "presenceId": format!("floor-{}-{}", hub.index, conn.id),
        "meshId": hello.mesh_id,
        "memberId": hello.member_id,
    });
    conn.queue(ws::encode_server_frame(
        OpCode::Text,
        ack.to_string().as_bytes(),
    ));
    let mesh: Arc<str> = hello.mesh_id.into();
    hub.subscribe(&mesh, conn);
    *joined = Some(Joined {
        sender: push::sender_fields(&mesh, &hello.pubkey),
        mesh,
    });
}
