//! `Gather`: the HTTP port's connections write through it. It gathers writes in a buffer of
//! its own until the writer flushes (or it holds `HIGH_WATER` bytes), writes them out in as
//! few syscalls as the socket allows, and then frees the buffer: a connection that is not
//! writing holds none of it. Reads pass straight through.
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

pub struct Gather<S: AsyncWrite + Unpin> {
    inner: S,
    buf: Vec<u8>,
    /// Bytes of `buf` already written to `inner`.
    written: usize,
}

impl<S: AsyncWrite + Unpin> Gather<S> {
    pub fn new(inner: S) -> Self {
        Gather {
            inner,
            buf: Vec::new(),
            written: 0,
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

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Gather<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
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
