//! The `ambassador` binary: parse, log, pick an engine, bind, serve.
//!
//! Exit codes: 0 after the drain (or `--check`), 2 for bad input (one line
//! naming the variable or flag), 1 when start-up fails (a listener cannot be
//! bound, the requested engine cannot start, capabilities cannot be
//! dropped) or when a second SIGTERM/SIGINT cut the drain short.

use ambassador::cli::Cli;
use ambassador::config::LogFormat;
use ambassador::{engine, server};
use clap::{CommandFactory, FromArgMatches};
use std::io::IsTerminal;
use std::process::ExitCode;

fn main() -> ExitCode {
    ignore_sighup();
    // `ambassador register …` is its own small program (a host named
    // `register` in the classic `HOST PORT` mode needs `--forward`).
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == "register") {
        init_logging(LogFormat::Text);
        return ExitCode::from(ambassador::discovery::register::main(args.collect()));
    }
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    cli.mark_explicit(&matches);
    let vars: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os().collect();
    let (settings, skipped) = match cli.settings(vars.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ambassador: error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = ambassador::loops::check_startup(&settings.forwards) {
        eprintln!("ambassador: error: {e}");
        return ExitCode::from(2);
    }
    let metrics = match cli.metrics_addr() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("ambassador: error: {e}");
            return ExitCode::from(2);
        }
    };
    // The sockmap engine's tuning variables are bad input too, even where
    // `--mode auto` would not end up choosing that engine.
    if let Err(e) = engine::sockmap::Tuning::from_env() {
        eprintln!("ambassador: error: {e}");
        return ExitCode::from(2);
    }
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
    // Forwards from etcd: the first read of each, before anything is bound
    // (an etcd that cannot be reached is bad input: one line, exit 2).
    let wait = !cli.etcd_start_empty;
    let feeds = match ambassador::discovery::etcd::Feeds::start_all(&settings.forwards, wait) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ambassador: error: {e}");
            return ExitCode::from(2);
        }
    };

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
                let (s, _) = cli.settings(vars.clone()).map_err(|e| e.to_string())?;
                ambassador::loops::check_startup(&s.forwards).map_err(|e| e.to_string())?;
                Ok(s)
            }),
        }
    };
    match server::run_with(settings, engine, listeners, Some(reloader), feeds) {
        Ok(server::Stop::Drained | server::Stop::TimedOut) => ExitCode::SUCCESS,
        Ok(server::Stop::Forced) => ExitCode::from(1),
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

/// SIGHUP must never kill the process, not even during start-up (loading
/// the BPF program can take a while): ignore it until the server installs
/// its handler, which logs it instead.
fn ignore_sighup() {
    // Safety: setting a signal's disposition to SIG_IGN runs no code of ours
    // in signal context; no other thread exists yet.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
}
