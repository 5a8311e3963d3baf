//! `inferctl`: command-line client for the inferd daemon.
//!
//! Exit codes: 0 success; 1 the daemon answered with an error; 2 the daemon
//! could not be reached or the conversation failed (or bad local input).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use inferd_client::{format_status, Client, ClientError};

/// Program name sent in the hello (shows in the daemon's log).
const PROGRAM: &str = "inferctl";

#[derive(Debug, Parser)]
#[command(
    name = "inferctl",
    version,
    about = "Talk to the inferd embedding daemon"
)]
struct Cli {
    /// Path of the daemon's Unix socket.
    #[arg(
        long,
        global = true,
        env = "INFERD_SOCKET",
        default_value = "/run/inferd/inferd.sock",
        value_name = "PATH"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Embed texts and print the result as JSON on stdout.
    ///
    /// Without TEXT arguments, reads one text per line from stdin.
    Embed {
        /// Ask the daemon to answer within this many milliseconds.
        #[arg(long, value_name = "N")]
        deadline_ms: Option<u64>,
        /// Texts to embed, one vector each.
        texts: Vec<String>,
    },
    /// Show the worker pool: workers, queue, counters.
    Status {
        /// Print the status as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Rolling restart: replace every worker, one at a time, each replacement
    /// Ready before the old one stops; waits until the roll is complete.
    ///
    /// Fails (exit 1) when the new workers cannot start: the roll is then
    /// given up and the old workers keep serving.
    Roll {
        /// Stop waiting after this many seconds (exit 2); the roll goes on
        /// in the daemon, `inferctl status` shows how far it got.
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        timeout: u64,
    },
    /// Print the counters and gauges in Prometheus text format.
    Metrics,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("inferctl: cannot start the async runtime: {err}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("inferctl: {}", report(&err));
            exit_code(&err)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Embed { deadline_ms, texts } => {
            let texts = if texts.is_empty() {
                read_stdin_lines()?
            } else {
                texts
            };
            if texts.is_empty() {
                anyhow::bail!(
                    "no texts to embed: pass TEXT arguments or one text per line on stdin"
                );
            }
            let mut client = Client::connect_as(&cli.socket, PROGRAM).await?;
            let result = client
                .embed(texts, deadline_ms.map(Duration::from_millis))
                .await?;
            print_json(&result)
        }
        Command::Status { json } => {
            let mut client = Client::connect_as(&cli.socket, PROGRAM).await?;
            let status = client.status().await?;
            if json {
                print_json(&status)
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(format_status(&status).as_bytes())
                    .and_then(|()| out.flush())
                    .context("cannot write to stdout")
            }
        }
        Command::Roll { timeout } => {
            let mut client = Client::connect_as(&cli.socket, PROGRAM).await?;
            let replaced = tokio::time::timeout(Duration::from_secs(timeout), client.roll())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "the roll was not complete after {timeout} s; it goes on in the daemon (see `inferctl status`)"
                    )
                })??;
            println!("roll complete: {replaced} worker(s) replaced");
            Ok(())
        }
        Command::Metrics => {
            let mut client = Client::connect_as(&cli.socket, PROGRAM).await?;
            let text = client.metrics().await?;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .context("cannot write to stdout")
        }
    }
}

fn read_stdin_lines() -> anyhow::Result<Vec<String>> {
    std::io::stdin()
        .lock()
        .lines()
        .collect::<Result<_, _>>()
        .context("cannot read texts from stdin")
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value).context("cannot write JSON to stdout")?;
    out.write_all(b"\n")
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// 1 when the daemon answered with a typed error, 2 for everything else.
fn exit_code(err: &anyhow::Error) -> ExitCode {
    match err.downcast_ref::<ClientError>() {
        Some(e) if e.is_request_error() => ExitCode::from(1),
        _ => ExitCode::from(2),
    }
}

/// The error and its causes on one line, skipping causes whose message the
/// line already contains.
fn report(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}
