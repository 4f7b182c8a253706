//! The `ambassador` binary: parse, log, pick an engine, bind, serve.
//!
//! Exit codes: 0 after a clean drain (or `--check`), 2 for bad input (one
//! line naming the variable or flag), 1 when start-up fails (a listener
//! cannot be bound, the requested engine cannot start).

use ambassador::cli::Cli;
use ambassador::config::LogFormat;
use ambassador::{engine, server};
use clap::{CommandFactory, FromArgMatches};
use std::io::IsTerminal;
use std::process::ExitCode;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    cli.mark_explicit(&matches);
    // Non-UTF-8 variables cannot be link variables; skip them.
    let vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let (settings, skipped) = match cli.settings(vars.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ambassador: error: {e}");
            return ExitCode::from(2);
        }
    };
    let metrics = match cli.metrics_addr() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("ambassador: error: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        print!("{}", ambassador::cli::table(&settings, &skipped));
        if cli.config.is_some() {
            print!("{}", ambassador::cli::settings_line(&settings));
        }
        return ExitCode::SUCCESS;
    }
    init_logging(cli.log_format);
    for s in &skipped {
        tracing::warn!(var = %s.var, reason = s.why, "link variable skipped");
    }
    raise_fd_limit();

    let engine = match engine::select(&settings) {
        Ok(e) => e,
        Err(reason) => {
            tracing::error!("{reason}");
            return ExitCode::from(1);
        }
    };
    let listeners = match server::bind_all(&settings) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(1);
        }
    };
    if let Some(addr) = metrics
        && let Err(e) = ambassador::http::start(addr)
    {
        tracing::error!("{e}");
        return ExitCode::from(1);
    }
    // SIGHUP and file changes build the configuration again the same way.
    let reloader = {
        let cli = cli.clone();
        server::Reloader {
            path: cli.config.clone(),
            load: Box::new(move || {
                cli.settings(vars.clone())
                    .map(|(s, _)| s)
                    .map_err(|e| e.to_string())
            }),
        }
    };
    match server::run_with(settings, engine, listeners, Some(reloader)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Each connection holds two descriptors: raise the soft limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
