//! A connection's read buffer, sized from its last read.
use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;

/// Read buffers are sized from the last read: an idle connection (the
/// broker holds 100k+ of them, each with a read always pending) keeps only
/// `READ_MIN` bytes until it sends; after that, room for twice its last
/// read, up to `READ_MAX`. A buffer is resized only when it is empty.
const READ_MIN: usize = 256;
const READ_MAX: usize = 64 * 1024;

/// A connection's read buffer and the size of its last read.
#[derive(Default)]
pub(super) struct ReadBuf {
    pub data: Vec<u8>,
    last_read: usize,
    /// Bytes read over the connection's life. A read cut off by a deadline
    /// takes `data` with it, so whether a request had begun is told from
    /// this instead.
    pub received: u64,
}

impl ReadBuf {
    /// Appends what the socket has; false on EOF or error.
    pub async fn fill(&mut self, stream: &mut impl AsyncReadRent) -> bool {
        if self.data.is_empty() {
            // Room for twice the last read: a peer whose reads carry more
            // gets more room, so its reads (and the broker's answers) batch
            // ever more messages per syscall. Measured: keeping a single
            // message's read at its own size halves direct-send throughput.
            let want = (2 * self.last_read)
                .clamp(READ_MIN, READ_MAX)
                .next_power_of_two();
            if self.data.capacity() != want {
                self.data = Vec::with_capacity(want);
            }
        } else if self.data.capacity() - self.data.len() < READ_MIN / 2 {
            self.data.reserve(self.data.capacity().max(READ_MIN));
        }
        let len = self.data.len();
        let cap = self.data.capacity();
        let owned = std::mem::take(&mut self.data);
        let (res, slice) = stream.read(owned.slice_mut(len..cap)).await;
        self.data = slice.into_inner();
        match res {
            Ok(n) if n > 0 => {
                self.last_read = n;
                self.received += n as u64;
                true
            }
            _ => false,
        }
    }
}
