//! A raw socket to the daemon, for sending bytes no well-behaved client would.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use inferd_proto::{decode_payload, encode_frame, Hello, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long the daemon gets to answer or close a raw connection.
const RAW_TIMEOUT: Duration = Duration::from_secs(10);

/// A plain Unix stream to the daemon with frame helpers.
#[derive(Debug)]
pub struct RawConn {
    /// The socket.
    stream: UnixStream,
}

impl RawConn {
    /// Connects to `path`; panics if the daemon does not accept.
    pub async fn connect(path: impl AsRef<Path>) -> RawConn {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", path.display()));
        RawConn { stream }
    }

    /// Writes `bytes` as they are. An error means the daemon already closed
    /// the connection (broken pipe / reset).
    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Writes one frame: the length prefix and `payload`.
    pub async fn write_frame(&mut self, payload: &[u8]) -> io::Result<()> {
        let len = u32::try_from(payload.len()).expect("test payloads fit in a u32");
        let mut frame = len.to_le_bytes().to_vec();
        frame.extend_from_slice(payload);
        self.write(&frame).await
    }

    /// Writes a serialised message as one frame.
    pub async fn send<T: serde::Serialize>(&mut self, message: &T) -> io::Result<()> {
        let frame = encode_frame(message).expect("test messages encode");
        self.write(&frame).await
    }

    /// Reads one whole frame's payload; `None` on EOF (or reset) before a
    /// complete frame. Panics if nothing happens within 10 s.
    pub async fn read_frame(&mut self) -> Option<Vec<u8>> {
        let read = async {
            let mut len = [0u8; 4];
            self.stream.read_exact(&mut len).await.ok()?;
            let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
            self.stream.read_exact(&mut payload).await.ok()?;
            Some(payload)
        };
        tokio::time::timeout(RAW_TIMEOUT, read)
            .await
            .expect("the daemon neither sent a frame nor closed the connection within 10 s")
    }

    /// Reads the daemon's hello; panics if the first frame is not one.
    pub async fn read_hello(&mut self) -> Hello {
        let payload = self
            .read_frame()
            .await
            .expect("the daemon closed the connection before sending its hello");
        decode_payload(&payload).expect("the daemon's first frame is a hello")
    }

    /// Sends a hello with `protocol_version`.
    pub async fn send_hello(&mut self, protocol_version: u32) -> io::Result<()> {
        self.send(&Hello {
            protocol_version,
            software: "inferd-tests raw".into(),
        })
        .await
    }

    /// Completes a correct handshake and returns the daemon's hello.
    pub async fn handshake(&mut self) -> Hello {
        self.send_hello(PROTOCOL_VERSION)
            .await
            .expect("send our hello");
        let hello = self.read_hello().await;
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        hello
    }

    /// Reads until the daemon closes the connection (EOF or reset) and
    /// returns what arrived; panics if it stays open longer than `timeout`.
    pub async fn expect_closed(&mut self, timeout: Duration) -> Vec<u8> {
        let mut received = Vec::new();
        let read = async {
            let mut chunk = [0u8; 4096];
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) => return,
                    Ok(n) => received.extend_from_slice(&chunk[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                        ) =>
                    {
                        return
                    }
                    Err(e) => panic!("reading from the daemon failed: {e}"),
                }
            }
        };
        if tokio::time::timeout(timeout, read).await.is_err() {
            panic!(
                "the daemon did not close the connection within {timeout:?} ({} bytes received)",
                received.len()
            );
        }
        received
    }

    /// Half-closes our side (the daemon sees EOF) and keeps the read side.
    pub async fn shutdown_write(&mut self) -> io::Result<()> {
        self.stream.shutdown().await
    }

    /// Bytes that have arrived and wait to be read (`FIONREAD`): tells,
    /// without blocking, whether the daemon sent more than was read so far.
    pub fn readable_bytes(&self) -> io::Result<usize> {
        self.ioctl_count(libc::FIONREAD)
    }

    /// Bytes written on this connection that the daemon has not read yet
    /// (`SIOCOUTQ`, which for a Unix socket counts what still sits in the
    /// peer's receive queue): 0 once the daemon has consumed everything.
    pub fn unread_by_daemon(&self) -> io::Result<usize> {
        self.ioctl_count(libc::TIOCOUTQ)
    }

    /// True while the connection is open and nothing waits to be read (no
    /// frame, no EOF, no reset), checked without blocking.
    pub fn is_open_and_quiet(&self) -> io::Result<bool> {
        let mut poll = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd for an fd we own, and a zero timeout.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        if ready < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ready == 0)
    }

    fn ioctl_count(&self, request: libc::Ioctl) -> io::Result<usize> {
        let mut count: libc::c_int = 0;
        // SAFETY: both requests write one int through the pointer, into a
        // local that outlives the call; the fd is ours and open.
        let rc = unsafe { libc::ioctl(self.stream.as_raw_fd(), request, &mut count) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(count).unwrap_or(0))
    }

    /// The socket, for anything else.
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }
}
