//! `inferd-worker`: exec'd by `inferd`, never started by hand.

use std::io::IsTerminal;
use std::os::fd::RawFd;
use std::process::ExitCode;

use clap::Parser;

/// inferd worker process. Started by the inferd supervisor with one end of a
/// socketpair as an inherited fd; not meant to be run by hand.
#[derive(Parser, Debug)]
#[command(name = "inferd-worker", version)]
struct Args {
    /// Inherited socket fd connected to the supervisor.
    #[arg(long)]
    fd: RawFd,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("inferd-worker: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // SAFETY: the supervisor passes this fd to us and nothing else in
        // this fresh process has touched it.
        let stream = unsafe { inferd_worker::adopt_socket(args.fd) }?;
        inferd_worker::serve(stream).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("worker failed: {:#}", anyhow::Error::from(err));
            ExitCode::FAILURE
        }
    }
}
