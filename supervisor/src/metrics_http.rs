//! The optional loopback TCP listener for Prometheus scrapes
//! (`metrics_listen = "127.0.0.1:9464"`, off by default).
//!
//! It answers `GET /metrics` with the same text as `inferctl metrics` and
//! anything else with 404, one request per connection, then closes. That is
//! all a scraper needs, so it is a few lines over a `TcpListener` rather than
//! an HTTP framework. Each connection gets [`REQUEST_TIMEOUT`] to send its
//! request head (at most [`MAX_HEAD`] bytes); slow or oversized ones are
//! dropped. Only loopback addresses are accepted (checked in the config).

use std::net::SocketAddr;
use std::time::Duration;

use inferd_proto::ServerMessage;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::pool::PoolMsg;
use crate::request::Responder;

/// Time a scraper gets to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read.
pub const MAX_HEAD: usize = 8 * 1024;

/// Binds `addr`; the returned listener is served by [`serve`].
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "metrics on http://{}/metrics", listener.local_addr()?);
    Ok(listener)
}

/// Accepts scrapes until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    pool: mpsc::Sender<PoolMsg>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(error = %err, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let pool = pool.clone();
        tokio::spawn(async move {
            if let Err(err) = answer(stream, &pool).await {
                debug!(%peer, error = %err, "metrics request failed");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, pool: &mpsc::Sender<PoolMsg>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read_head = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        std::io::Result::Ok(())
    };
    if tokio::time::timeout(REQUEST_TIMEOUT, read_head)
        .await
        .is_err()
    {
        return Ok(());
    }
    let request_line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let (status, body) = if request_line.starts_with(b"GET /metrics ") {
        match metrics_text(pool).await {
            Some(text) => ("200 OK", text),
            None => (
                "503 Service Unavailable",
                "inferd is shutting down\n".to_owned(),
            ),
        }
    } else {
        (
            "404 Not Found",
            "only GET /metrics is served here\n".to_owned(),
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Asks the pool for the exposition text, as `inferctl metrics` does.
async fn metrics_text(pool: &mpsc::Sender<PoolMsg>) -> Option<String> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let responder = Responder::new(0, tx);
    pool.send(PoolMsg::Metrics { responder }).await.ok()?;
    match rx.recv().await? {
        ServerMessage::Metrics { text, .. } => Some(text),
        _ => None,
    }
}
