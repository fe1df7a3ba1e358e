//! `WsSocket`: a WebSocket's I/O over the upgraded HTTP connection. Reads land in a buffer of
//! the thread's and become messages (`frame::Incoming`); only bytes of an incomplete frame
//! are kept per connection, and only while it is incomplete. Writes are whole buffers of
//! frames the connection has already made (one write and one flush per batch).

use std::cell::RefCell;
use std::io;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::frame::{Incoming, Message, ReadError};

thread_local! {
    /// Where reads land when the connection keeps nothing: one per thread, never per
    /// connection, as big as the largest read asked for.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What a socket reads: messages of at most `message` bytes, at most `read` bytes per read.
#[derive(Clone, Copy)]
pub struct Limits {
    pub message: usize,
    pub read: usize,
}

/// Why reading stopped.
#[derive(Debug)]
pub enum Broken {
    /// The client's input broke RFC 6455 or a limit.
    Frame(ReadError),
    /// The socket failed.
    Io(io::Error),
}

pub struct WsSocket<S> {
    io: S,
    /// Boxed, and only while it holds something: an idle connection keeps none.
    incoming: Option<Box<Incoming>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsSocket<S> {
    pub fn new(io: S) -> Self {
        WsSocket { io, incoming: None }
    }

    /// The next message from the client, `None` once its socket ended.
    pub fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        limits: Limits,
    ) -> Poll<Option<Result<Message, Broken>>> {
        loop {
            if let Some(incoming) = self.incoming.as_mut() {
                match incoming.next(limits.message) {
                    Ok(Some(message)) => {
                        if incoming.is_empty() {
                            self.incoming = None;
                        }
                        return Poll::Ready(Some(Ok(message)));
                    }
                    Ok(None) => {}
                    Err(err) => return Poll::Ready(Some(Err(Broken::Frame(err)))),
                }
            }
            match ready!(self.poll_fill(cx, limits.read)) {
                Ok(0) => return Poll::Ready(None),
                Ok(_) => {}
                Err(err) => return Poll::Ready(Some(Err(Broken::Io(err)))),
            }
        }
    }

    /// Reads at most `size` bytes into the thread's buffer and keeps them (after what is
    /// kept already). A frame then grows by what arrives, never by what its header
    /// announces. `Ok(0)`: the socket ended.
    fn poll_fill(&mut self, cx: &mut Context<'_>, size: usize) -> Poll<io::Result<usize>> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if scratch.len() < size {
                scratch.resize(size, 0);
            }
            let mut read = ReadBuf::new(&mut scratch[..size]);
            ready!(std::pin::Pin::new(&mut self.io).poll_read(cx, &mut read))?;
            let read = read.filled();
            match self.incoming.as_mut() {
                _ if read.is_empty() => {}
                Some(incoming) => incoming.buf_mut().extend_from_slice(read),
                None => self.incoming = Some(Box::new(Incoming::new(BytesMut::from(read)))),
            }
            Poll::Ready(Ok(read.len()))
        })
    }

    /// The next message (see `poll_next`).
    pub async fn next(&mut self, limits: Limits) -> Option<Result<Message, Broken>> {
        std::future::poll_fn(|cx| self.poll_next(cx, limits)).await
    }

    /// Writes frames made with `frame::put_message` and `frame::put_control`, and flushes.
    pub async fn send(&mut self, frames: &[u8]) -> io::Result<()> {
        self.write(frames).await?;
        self.flush().await
    }

    /// Writes frames; they may wait in the connection's write buffer until `flush`.
    pub async fn write(&mut self, frames: &[u8]) -> io::Result<()> {
        self.io.write_all(frames).await
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        self.io.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::{Control, Kind, put_control, put_message};
    use super::*;
    use bytes::{BufMut, Bytes};
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixStream;

    fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut frame = vec![0x80 | opcode];
        if payload.len() < 126 {
            frame.push(0x80 | payload.len() as u8);
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    #[tokio::test]
    async fn messages_come_out_whole_however_the_bytes_arrive_and_nothing_is_kept_after() {
        let (near, mut far) = UnixStream::pair().unwrap();
        let mut socket = WsSocket::new(near);
        let big: Vec<u8> = (0..200_000).map(|i| (i % 249) as u8).collect();
        let mut bytes = masked(0x1, b"first");
        bytes.extend(masked(0x2, &big));
        bytes.extend(masked(0x1, b"last"));
        let writer = tokio::spawn(async move {
            for piece in bytes.chunks(1000) {
                far.write_all(piece).await.unwrap();
            }
            far
        });
        let limit = Limits {
            message: 1 << 20,
            read: 4096,
        };
        let first = socket.next(limit).await.unwrap().unwrap();
        assert_eq!(first, Message::Text(Bytes::from("first")));
        assert_eq!(
            socket.next(limit).await.unwrap().unwrap(),
            Message::Binary(BytesMut::from(&big[..]))
        );
        assert_eq!(
            socket.next(limit).await.unwrap().unwrap(),
            Message::Text(Bytes::from("last"))
        );
        assert!(socket.incoming.is_none(), "an idle socket keeps no buffer");
        drop(writer.await.unwrap());
        assert!(
            socket.next(limit).await.is_none(),
            "the end of the socket ends the messages"
        );
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_is_refused_from_its_header() {
        let (near, mut far) = UnixStream::pair().unwrap();
        let mut socket = WsSocket::new(near);
        // Only the header of a 1 MiB frame is ever sent.
        let header = &masked(0x2, &vec![0; 1 << 20])[..14];
        far.write_all(header).await.unwrap();
        let limits = Limits {
            message: 1000,
            read: 4096,
        };
        let read = socket.next(limits).await.unwrap();
        assert!(
            matches!(read, Err(Broken::Frame(ReadError::TooLong))),
            "{read:?}"
        );
    }

    #[tokio::test]
    async fn sent_frames_arrive_as_written() {
        let (near, mut far) = UnixStream::pair().unwrap();
        let mut socket = WsSocket::new(near);
        let mut out = BytesMut::new();
        put_message(&mut out, Kind::Text, |buf, _| buf.put_slice(b"hello"));
        put_control(&mut out, Control::Close(1000, "bye"));
        socket.send(&out).await.unwrap();
        let mut read = vec![0; out.len()];
        far.read_exact(&mut read).await.unwrap();
        assert_eq!(read, &out[..]);
        assert_eq!(&read[..7], b"\x81\x05hello");
    }
}
