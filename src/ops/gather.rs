//! `Gather`: the HTTP port's connections write through it. It gathers writes in a buffer of
//! its own until the writer flushes (or it holds `HIGH_WATER` bytes), writes them out in as
//! few syscalls as the socket allows, and then frees the buffer: a connection that is not
//! writing holds none of it. Reads pass straight through, except that a reader with a small
//! buffer that keeps filling it is served from a short-lived read-ahead buffer (below).
//!
//! Why: tungstenite, under the WebSocket front-end, gathers frames in a `Vec` of its own that
//! keeps its capacity for the connection's life (up to its write buffer size, 128 KiB, after
//! one burst: ~64 KiB per connection that once received 256 small messages in one batch).
//! With its write buffer size at 0 it hands each frame straight down here instead, keeping
//! only the frame in hand, and the syscalls stay one per flush.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes gathered before a write goes out without waiting for a flush (and the most a write
/// call adds before it waits for the socket to take some).
pub const HIGH_WATER: usize = 64 * 1024;
/// The first allocation when a write starts a batch (most answers fit; a burst grows it).
const FIRST_CAPACITY: usize = 4 * 1024;
/// A read into less room than this is "small": tungstenite's, which reads at most its
/// `read_buffer_size` (`ws_read_buffer_bytes`, 256 by default) per call and keeps that buffer
/// for the connection's life. hyper's own reads offer 8 KiB or more and go straight through.
const SMALL_READ: usize = 2 * 1024;
/// What one small read takes from the socket at most.
const READ_AHEAD: usize = 8 * 1024;

thread_local! {
    /// Where small reads land first: one per thread, never per connection.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; READ_AHEAD].into_boxed_slice());
}

pub struct Gather<S: AsyncWrite + Unpin> {
    inner: S,
    buf: Vec<u8>,
    /// Bytes of `buf` already written to `inner`.
    written: usize,
    /// What a small read took from the socket beyond the reader's room, not yet handed over
    /// (from `ahead_read` on); exactly that big, and freed once empty, so an idle connection
    /// holds none of it. A small read buffer then costs a copy per call instead of a syscall:
    /// a 4 KiB message is one read from the socket, not sixteen.
    ahead: Vec<u8>,
    ahead_read: usize,
}

impl<S: AsyncWrite + Unpin> Gather<S> {
    pub fn new(inner: S) -> Self {
        Gather {
            inner,
            buf: Vec::new(),
            written: 0,
            ahead: Vec::new(),
            ahead_read: 0,
        }
    }

    /// Bytes gathered and not yet written out.
    fn pending(&self) -> usize {
        self.buf.len() - self.written
    }

    fn gather(&mut self, data: &[u8]) {
        if self.buf.capacity() == 0 {
            self.buf.reserve(data.len().max(FIRST_CAPACITY));
        }
        self.buf.extend_from_slice(data);
    }
}

impl<S: AsyncWrite + Unpin> Gather<S> {
    /// Writes out everything gathered, then frees the buffer.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes room for more: past `HIGH_WATER`, what is gathered goes out first.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending() >= HIGH_WATER {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

/// What is still gathered goes out now if the socket takes it: tungstenite writes its reply to
/// a client's close frame and then ends the connection without a flush (a plain socket would
/// have sent it), so the last bytes are written here, without waiting.
impl<S: AsyncWrite + Unpin> Drop for Gather<S> {
    fn drop(&mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        let _ = self.poll_drain(&mut cx);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Gather<S> {
    /// Hands over what was read ahead, as much as fits; frees the buffer once it is empty.
    fn take_ahead(&mut self, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.ahead.len() - self.ahead_read);
        buf.put_slice(&self.ahead[self.ahead_read..self.ahead_read + n]);
        self.ahead_read += n;
        if self.ahead_read == self.ahead.len() {
            self.ahead = Vec::new();
            self.ahead_read = 0;
        }
    }

    /// One read of up to `READ_AHEAD` bytes from the socket into the thread's scratch
    /// buffer; hands over what fits and keeps the rest.
    fn poll_read_ahead(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut into = ReadBuf::new(scratch);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut into))?;
            let read = into.filled();
            let n = read.len().min(buf.remaining());
            buf.put_slice(&read[..n]);
            if n < read.len() {
                self.ahead = read[n..].to_vec();
                self.ahead_read = 0;
            }
            Poll::Ready(Ok(()))
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Gather<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.ahead_read < this.ahead.len() {
            this.take_ahead(buf);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= SMALL_READ {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        this.poll_read_ahead(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gather<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_room(cx))?;
        if this.pending() == 0 && data.len() >= HIGH_WATER {
            // Nothing gathered and a large write: no copy.
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.gather(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_room(cx))?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.pending() == 0 && total >= HIGH_WATER {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.gather(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_wait_for_the_flush_and_the_buffer_is_freed_after_it() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut gather = Gather::new(near);
        gather.write_all(b"hello ").await.unwrap();
        gather.write_all(b"world").await.unwrap();
        assert_eq!(gather.pending(), 11, "gathered, not written");
        gather.flush().await.unwrap();
        assert_eq!(gather.buf.capacity(), 0, "freed once written");
        let mut got = [0u8; 11];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
    }

    #[tokio::test]
    async fn a_full_socket_holds_back_writes_past_the_high_water_mark() {
        // The far side reads nothing: the pipe takes 1 KiB, the gather buffer HIGH_WATER.
        let (near, mut far) = tokio::io::duplex(1024);
        let mut gather = Gather::new(near);
        let chunk = vec![7u8; 1000];
        let mut accepted = 0;
        loop {
            let write = gather.write(&chunk);
            match tokio::time::timeout(std::time::Duration::from_millis(50), write).await {
                Ok(n) => accepted += n.unwrap(),
                Err(_) => break,
            }
        }
        assert!(
            (HIGH_WATER..HIGH_WATER + 2048).contains(&accepted),
            "{accepted} bytes accepted"
        );
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            far.read_to_end(&mut all).await.unwrap();
            all.len()
        });
        gather.shutdown().await.unwrap();
        drop(gather);
        assert_eq!(reader.await.unwrap(), accepted);
    }

    /// Counts the reads that reach the socket.
    struct Counted {
        inner: tokio::io::DuplexStream,
        reads: usize,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = &mut *self;
            let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
            if polled.is_ready() {
                this.reads += 1;
            }
            polled
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, data)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    fn counted() -> (Gather<Counted>, tokio::io::DuplexStream) {
        let (near, far) = tokio::io::duplex(1 << 20);
        let inner = Counted {
            inner: near,
            reads: 0,
        };
        (Gather::new(inner), far)
    }

    #[tokio::test]
    async fn small_reads_of_a_large_message_are_served_by_one_socket_read() {
        let (mut gather, mut far) = counted();
        let message: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        far.write_all(&message).await.unwrap();
        let mut got = Vec::new();
        while got.len() < message.len() {
            // tungstenite's way with `ws_read_buffer_bytes` = 256.
            let mut chunk = [0u8; 256];
            let n = gather.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, message);
        assert_eq!(
            gather.inner.reads, 1,
            "sixteen reads of 256 bytes from one socket read"
        );
        assert_eq!(
            gather.ahead.capacity(),
            0,
            "what was read ahead is freed once handed over"
        );
    }

    #[tokio::test]
    async fn a_small_read_keeps_nothing_and_large_reads_go_straight_through() {
        let (mut gather, mut far) = counted();
        far.write_all(&[9u8; 100]).await.unwrap();
        let mut chunk = [0u8; 256];
        assert_eq!(gather.read(&mut chunk).await.unwrap(), 100);
        assert_eq!(gather.ahead.capacity(), 0);
        // Waiting for input holds no buffer either.
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            gather.read(&mut chunk),
        )
        .await;
        assert!(waiting.is_err());
        assert_eq!(gather.ahead.capacity(), 0);
        // hyper's reads (8 KiB and more) are not copied.
        far.write_all(&[3u8; 5000]).await.unwrap();
        let mut large = vec![0u8; 8192];
        assert_eq!(gather.read(&mut large).await.unwrap(), 5000);
        assert_eq!(gather.inner.reads, 2);
        // The end of the input still reads as the end.
        drop(far);
        assert_eq!(gather.read(&mut chunk).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn what_was_never_flushed_goes_out_when_dropped() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut gather = Gather::new(near);
        gather.write_all(b"goodbye").await.unwrap();
        drop(gather);
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"goodbye");
    }
}
