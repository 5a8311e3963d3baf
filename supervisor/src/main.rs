//! `inferd`: parse flags, set up logging, run the daemon.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use inferd_supervisor::{Args, Config};

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
    let config = match Config::load(&args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("inferd: {:#}", anyhow::Error::from(err));
            return ExitCode::from(2);
        }
    };
    // Current-thread on purpose: workers' PR_SET_PDEATHSIG follows the
    // thread that spawned them, and the supervisor only shuffles bytes.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("inferd: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(inferd_supervisor::run(args, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("inferd failed: {:#}", anyhow::Error::from(err));
            ExitCode::FAILURE
        }
    }
}
