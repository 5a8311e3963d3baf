//! Targets and connections: one keep-alive HTTP/1.1 connection (hyper's
//! low-level client over a Unix or TCP stream) or one native inferd
//! connection ([`inferd_client::Client`]) per client and target.
//!
//! A request is timed from before it is written (or, when the server closed
//! the connection after its previous answer, from before the reconnect: a
//! real client pays that too) to the moment its answer is parsed into
//! vectors, which is what an application sees. Checking the answer (count,
//! order, dimensions, norms, token counts) happens after the clock stops.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONNECTION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use inferd_client::Client;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpStream, UnixStream};

use crate::texts::Api;

/// Where a target listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "address", rename_all = "lowercase")]
pub enum Address {
    /// A Unix socket path.
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// How a target is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1, JSON bodies.
    Http,
    /// inferd's bincode protocol (Unix sockets only).
    Native,
}

/// One side of the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// Name in the reports.
    pub label: String,
    /// HTTP or native.
    pub protocol: Protocol,
    /// Socket.
    pub address: Address,
}

impl Target {
    /// Parses `[LABEL=]ADDRESS` for `protocol`; a `=` counts as the label's
    /// end only when what precedes it has no `/` or `:` (so socket paths
    /// with `=` in them still work).
    pub fn parse(spec: &str, protocol: Protocol, tcp: bool) -> Result<Target> {
        let (label, address) = match spec.split_once('=') {
            Some((label, rest)) if !label.is_empty() && !label.contains(['/', ':']) => {
                (Some(label.to_owned()), rest)
            }
            _ => (None, spec),
        };
        ensure!(!address.is_empty(), "empty address in `{spec}`");
        let address = if tcp {
            ensure!(
                address.contains(':'),
                "`{address}` is not HOST:PORT (for --tcp)"
            );
            Address::Tcp(address.to_owned())
        } else {
            Address::Unix(PathBuf::from(address))
        };
        let label = label.unwrap_or_else(|| match protocol {
            Protocol::Http => format!("http {address}"),
            Protocol::Native => format!("native {address}"),
        });
        Ok(Target {
            label,
            protocol,
            address,
        })
    }
}

/// What every request sends and what its answer must hold.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    /// HTTP API shape.
    pub api: Api,
    /// HTTP path.
    pub path: String,
    /// The prepared JSON body (shared, never copied).
    pub body: Bytes,
    /// The texts, for the native protocol.
    pub texts: Vec<String>,
    /// Expected tokens per request (all texts), when checked.
    pub expect_tokens: Option<u64>,
    /// Per-request limit; past it the request counts as an error.
    pub timeout: Duration,
}

/// A checked answer.
#[derive(Debug)]
pub struct Answer {
    /// Request latency.
    pub latency: Duration,
    /// Vector length.
    pub dims: usize,
    /// The first vector, kept so sides can be compared.
    pub first: Vec<f32>,
    /// The server closed the connection after this answer.
    pub closed_by_server: bool,
    /// The connection was (re)opened inside this request's timing.
    pub connected_in_request: bool,
}

/// One live HTTP connection.
struct HttpConn {
    sender: SendRequest<Full<Bytes>>,
    /// The previous answer carried `Connection: close`.
    server_closes: bool,
}

/// One client's connection to one target, opened lazily.
pub struct Conn {
    target: Target,
    http: Option<HttpConn>,
    native: Option<Client>,
    /// Connections reopened because they were found closed while idle
    /// (between phases), outside any timing.
    pub idle_reconnects: u64,
}

impl Conn {
    /// A connection to `target`, not yet opened.
    pub fn new(target: Target) -> Conn {
        Conn {
            target,
            http: None,
            native: None,
            idle_reconnects: 0,
        }
    }

    /// Opens the connection if it is not open, or was closed while idle
    /// (inferd closes keep-alive connections idle for 5 s); untimed. A
    /// connection the server announced it would close is left for the next
    /// request to reopen inside its timing.
    pub async fn prepare(&mut self) -> Result<()> {
        match self.target.protocol {
            Protocol::Http => {
                let stale = match &self.http {
                    None => true,
                    Some(conn) => !conn.server_closes && conn.sender.is_closed(),
                };
                if stale {
                    if self.http.is_some() {
                        self.idle_reconnects += 1;
                    }
                    self.http = Some(self.connect_http().await?);
                }
            }
            Protocol::Native => {
                if self.native.is_none() {
                    self.native = Some(self.connect_native().await?);
                }
            }
        }
        Ok(())
    }

    /// Sends one request, waits for its answer and checks it. On error the
    /// connection is dropped, to be reopened by the next [`Conn::prepare`]
    /// or request.
    pub async fn request(&mut self, spec: &RequestSpec) -> Result<Answer> {
        let result = tokio::time::timeout(spec.timeout, self.request_inner(spec))
            .await
            .unwrap_or_else(|_| Err(anyhow!("no answer within {:?}", spec.timeout)));
        if result.is_err() {
            self.http = None;
            self.native = None;
        }
        result
    }

    async fn request_inner(&mut self, spec: &RequestSpec) -> Result<Answer> {
        match self.target.protocol {
            Protocol::Http => self.http_request(spec).await,
            Protocol::Native => self.native_request(spec).await,
        }
    }

    async fn http_request(&mut self, spec: &RequestSpec) -> Result<Answer> {
        let started = Instant::now();
        let mut connected_in_request = false;
        if self.http.as_ref().is_none_or(|c| c.server_closes) {
            self.http = Some(self.connect_http().await?);
            connected_in_request = true;
        }
        let Some(conn) = self.http.as_mut() else {
            bail!("no connection");
        };
        conn.sender
            .ready()
            .await
            .context("the connection closed before the request was sent")?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(spec.path.as_str())
            .header(HOST, "localhost")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(spec.body.clone()))
            .context("building the request")?;
        let response = conn
            .sender
            .send_request(request)
            .await
            .context("sending the request / reading the answer's head")?;
        let status = response.status();
        let closes = response
            .headers()
            .get(CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let tokens_header = response
            .headers()
            .get("x-compute-tokens")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading the answer's body")?
            .to_bytes();
        if status != StatusCode::OK {
            bail!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            );
        }
        let parsed = parse_body(spec.api, &body)?;
        let latency = started.elapsed();
        conn.server_closes = closes;
        let tokens = parsed.tokens.or(tokens_header);
        check(spec, &parsed.vectors, tokens, spec.api == Api::Openai)?;
        Ok(Answer {
            latency,
            dims: parsed.vectors[0].len(),
            first: parsed.vectors.into_iter().next().unwrap_or_default(),
            closed_by_server: closes,
            connected_in_request,
        })
    }

    async fn native_request(&mut self, spec: &RequestSpec) -> Result<Answer> {
        let started = Instant::now();
        let mut connected_in_request = false;
        if self.native.is_none() {
            self.native = Some(self.connect_native().await?);
            connected_in_request = true;
        }
        let Some(client) = self.native.as_mut() else {
            bail!("no connection");
        };
        let result = client
            .embed(spec.texts.clone(), None)
            .await
            .context("native request")?;
        let latency = started.elapsed();
        let tokens: u64 = result.token_counts.iter().map(|&n| u64::from(n)).sum();
        ensure!(
            result.dims as usize == result.embeddings.first().map_or(0, Vec::len),
            "dims {} does not match the vectors",
            result.dims
        );
        check(spec, &result.embeddings, Some(tokens), true)?;
        Ok(Answer {
            latency,
            dims: result.dims as usize,
            first: result.embeddings.into_iter().next().unwrap_or_default(),
            closed_by_server: false,
            connected_in_request,
        })
    }

    async fn connect_http(&self) -> Result<HttpConn> {
        let sender = match &self.target.address {
            Address::Unix(path) => {
                let stream = UnixStream::connect(path)
                    .await
                    .with_context(|| format!("connecting to {}", path.display()))?;
                handshake(stream).await?
            }
            Address::Tcp(addr) => {
                let stream = TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("connecting to {addr}"))?;
                stream.set_nodelay(true)?;
                handshake(stream).await?
            }
        };
        Ok(HttpConn {
            sender,
            server_closes: false,
        })
    }

    async fn connect_native(&self) -> Result<Client> {
        let Address::Unix(path) = &self.target.address else {
            bail!("the native protocol needs a Unix socket");
        };
        Ok(Client::connect_as(path, "inferd-http-load").await?)
    }
}

/// HTTP/1.1 handshake; the connection is driven by its own task, which
/// ends when the connection closes.
async fn handshake<S>(stream: S) -> Result<SendRequest<Full<Bytes>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(async move {
        // Its error (a reset, a close mid-answer) surfaces in the request.
        let _ = connection.await;
    });
    Ok(sender)
}

/// The vectors (and token count, when the API gives it) of an answer body.
struct Parsed {
    vectors: Vec<Vec<f32>>,
    tokens: Option<u64>,
}

#[derive(Deserialize)]
struct OpenAiAnswer {
    data: Vec<OpenAiItem>,
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
struct OpenAiItem {
    index: usize,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct OpenAiUsage {
    prompt_tokens: u64,
}

fn parse_body(api: Api, body: &[u8]) -> Result<Parsed> {
    match api {
        Api::Openai => {
            let answer: OpenAiAnswer =
                serde_json::from_slice(body).context("the answer is not OpenAI's shape")?;
            for (position, item) in answer.data.iter().enumerate() {
                ensure!(
                    item.index == position,
                    "data[{position}] has index {}",
                    item.index
                );
            }
            Ok(Parsed {
                vectors: answer.data.into_iter().map(|i| i.embedding).collect(),
                tokens: answer.usage.map(|u| u.prompt_tokens),
            })
        }
        Api::Tei => Ok(Parsed {
            vectors: serde_json::from_slice(body).context("the answer is not [[f32]]")?,
            tokens: None,
        }),
    }
}

/// One vector per text, all the same length, each of unit norm, and the
/// expected number of tokens (when known and checked; `require_tokens`
/// makes a missing count an error).
fn check(
    spec: &RequestSpec,
    vectors: &[Vec<f32>],
    tokens: Option<u64>,
    require_tokens: bool,
) -> Result<()> {
    ensure!(
        vectors.len() == spec.texts.len(),
        "{} vectors for {} texts",
        vectors.len(),
        spec.texts.len()
    );
    let dims = vectors[0].len();
    ensure!(dims > 0, "empty vector");
    for (i, vector) in vectors.iter().enumerate() {
        ensure!(
            vector.len() == dims,
            "vector {i} has {} dims, vector 0 {dims}",
            vector.len()
        );
        let norm = vector
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        ensure!(
            (norm - 1.0).abs() < 1e-3,
            "vector {i} has norm {norm}, not 1"
        );
    }
    if let Some(expected) = spec.expect_tokens {
        match tokens {
            Some(got) => ensure!(got == expected, "{got} tokens, expected {expected}"),
            None if require_tokens => bail!("the answer has no token count"),
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(texts: usize, expect_tokens: Option<u64>) -> RequestSpec {
        RequestSpec {
            api: Api::Openai,
            path: "/v1/embeddings".into(),
            body: Bytes::new(),
            texts: vec!["x".into(); texts],
            expect_tokens,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn targets_parse_with_and_without_labels() {
        let t = Target::parse("inferd=/tmp/a.sock", Protocol::Http, false).expect("parse");
        assert_eq!(t.label, "inferd");
        assert_eq!(t.address, Address::Unix("/tmp/a.sock".into()));
        let t = Target::parse("/tmp/a=b.sock", Protocol::Native, false).expect("parse");
        assert_eq!(t.label, "native unix:/tmp/a=b.sock");
        let t = Target::parse("127.0.0.1:8000", Protocol::Http, true).expect("parse");
        assert_eq!(t.address, Address::Tcp("127.0.0.1:8000".into()));
        assert!(Target::parse("nohost", Protocol::Http, true).is_err());
        assert!(Target::parse("x=", Protocol::Http, false).is_err());
    }

    #[test]
    fn openai_answers_are_parsed_and_checked() {
        let body = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.6,0.8]},
            {"object":"embedding","index":1,"embedding":[1.0,0.0]}],"usage":{"prompt_tokens":16,"total_tokens":16}}"#;
        let parsed = parse_body(Api::Openai, body).expect("parse");
        assert_eq!(parsed.tokens, Some(16));
        check(&spec(2, Some(16)), &parsed.vectors, parsed.tokens, true).expect("valid");
        assert!(check(&spec(2, Some(8)), &parsed.vectors, parsed.tokens, true).is_err());
        assert!(check(&spec(3, None), &parsed.vectors, parsed.tokens, true).is_err());
        assert!(check(&spec(2, Some(16)), &parsed.vectors, None, true).is_err());
    }

    #[test]
    fn bad_answers_are_refused() {
        let swapped = br#"{"data":[{"index":1,"embedding":[1.0]},{"index":0,"embedding":[1.0]}]}"#;
        assert!(parse_body(Api::Openai, swapped).is_err());
        let parsed = parse_body(Api::Tei, b"[[0.5,0.5]]").expect("parse");
        assert!(check(&spec(1, None), &parsed.vectors, None, false).is_err());
        assert!(parse_body(Api::Tei, b"{}").is_err());
    }
}
