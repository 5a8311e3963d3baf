//! `inferd`: parse flags, set up logging, run the daemon.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use inferd_supervisor::{Args, Config, LogFormat};

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let human = match args.log_format {
        LogFormat::Human => true,
        LogFormat::Plain => false,
        LogFormat::Auto => std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(human);
    if human {
        builder.init();
    } else {
        builder.without_time().init();
    }
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
