//! The command line, and how it and the environment become [`Settings`].
//!
//! Forwards come from three sources, all combined: Docker link variables in
//! the environment (the classic image's only source; `--no-env` ignores
//! them), `--forward` flags, and the classic image's positional `HOST PORT`.
//! Any problem is one [`ConfigError`] line naming the variable or flag; the
//! binary prints it and exits with code 2.

use crate::config::env::{self, Skipped};
use crate::config::{Forward, LogFormat, Mode, Proto, Settings, SplicePolicy, parse};
use clap::Parser;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "ambassador",
    version,
    about = "Forward TCP ports for the Docker ambassador pattern, splicing in the kernel when it can.",
    after_help = "Classic usage: DB_PORT_6379_TCP=tcp://10.0.0.2:6379 ambassador\n\
                  (listens on 6379, the port in the variable's name, and forwards to 10.0.0.2:6379)"
)]
pub struct Cli {
    /// Forward: [LISTEN_ADDR:]PORT=HOST:PORT (repeatable). IPv6 in brackets.
    #[arg(long = "forward", short = 'f', value_name = "[ADDR:]PORT=HOST:PORT")]
    pub forwards: Vec<String>,

    /// Engine: auto picks sockmap, then uring, then epoll.
    #[arg(long, value_enum, default_value_t = Mode::Auto, env = "AMBASSADOR_MODE")]
    pub mode: Mode,

    /// Which connections the sockmap engine splices in the kernel.
    #[arg(long, value_enum, default_value_t = SplicePolicy::Adaptive)]
    pub splice: SplicePolicy,

    /// Print the forwards and exit without binding anything.
    #[arg(long)]
    pub check: bool,

    /// Ignore Docker link variables in the environment.
    #[arg(long)]
    pub no_env: bool,

    /// Do not set TCP_NODELAY on the sockets.
    #[arg(long)]
    pub no_nodelay: bool,

    /// Upstream connect timeout (5, 5s, 250ms).
    #[arg(long, default_value = "5s", value_name = "DUR")]
    pub connect_timeout: String,

    /// Close a connection with no traffic either way for this long.
    #[arg(long, value_name = "DUR")]
    pub idle_timeout: Option<String>,

    /// Connections at once per forward (0 = unlimited). When full, stop accepting.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub max_conns: usize,

    /// After SIGTERM/SIGINT, how long live connections may take to finish.
    #[arg(long, default_value = "30s", value_name = "DUR")]
    pub drain_timeout: String,

    /// Log format (filter with RUST_LOG).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Classic argument mode: forward PORT on all addresses to HOST:PORT.
    #[arg(value_name = "HOST PORT", num_args = 0..=2)]
    pub positional: Vec<String>,
}

/// A configuration problem, printed as one line; exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// A duration flag's value; `zero_ok` says whether 0 means something.
fn flag_duration(flag: &str, v: &str, zero_ok: bool) -> Result<Duration, ConfigError> {
    let d = parse::duration(v).map_err(|e| ConfigError(format!("{flag}: {e}")))?;
    if d.is_zero() && !zero_ok {
        return Err(ConfigError(format!("{flag}: must be more than 0")));
    }
    Ok(d)
}

impl Cli {
    /// Build [`Settings`] from the flags and the given environment (as
    /// `std::env::vars_os()` gives it). Also returns the link variables that
    /// were skipped, for logging.
    pub fn settings(
        &self,
        vars: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<(Settings, Vec<Skipped>), ConfigError> {
        let mut forwards = Vec::new();
        let mut skipped = Vec::new();
        if !self.no_env {
            let scan = env::scan_os(vars).map_err(ConfigError)?;
            forwards.extend(scan.forwards);
            skipped = scan.skipped;
        }
        for f in &self.forwards {
            let (listen, target) =
                parse::forward(f).map_err(|e| ConfigError(format!("--forward {f}: {e}")))?;
            forwards.push(Forward {
                source: format!("--forward {f}"),
                listen,
                target,
                proto: Proto::Tcp,
            });
        }
        match self.positional.as_slice() {
            [] => {}
            [host, port] => {
                let spec = if host.contains(':') && !host.starts_with('[') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                };
                let target = parse::target(&spec)
                    .map_err(|e| ConfigError(format!("HOST PORT arguments: {e}")))?;
                forwards.push(Forward {
                    source: format!("args {host} {port}"),
                    listen: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), target.port),
                    target,
                    proto: Proto::Tcp,
                });
            }
            [one] => {
                return Err(ConfigError(format!(
                    "HOST PORT arguments: got only {one:?}; expected a host and a port"
                )));
            }
            _ => unreachable!("clap limits positional arguments to 2"),
        }
        if forwards.is_empty() {
            let mut msg = format!(
                "no forwards configured: looked for {}, --forward flags and HOST PORT arguments",
                env::LOOKED_FOR
            );
            if self.no_env {
                msg.push_str(" (environment ignored: --no-env)");
            }
            if !skipped.is_empty() {
                let names: Vec<&str> = skipped.iter().map(|s| s.var.as_str()).collect();
                msg.push_str(&format!("; skipped {}", names.join(", ")));
            }
            return Err(ConfigError(msg));
        }
        check_overlaps(&forwards)?;
        let settings = Settings {
            forwards,
            mode: self.mode,
            splice: self.splice,
            nodelay: !self.no_nodelay,
            connect_timeout: flag_duration("--connect-timeout", &self.connect_timeout, false)?,
            idle_timeout: self
                .idle_timeout
                .as_deref()
                .map(|v| flag_duration("--idle-timeout", v, false))
                .transpose()?,
            max_conns: self.max_conns,
            // 0: on SIGTERM, reset every live connection at once.
            drain_timeout: flag_duration("--drain-timeout", &self.drain_timeout, true)?,
        };
        Ok((settings, skipped))
    }
}

/// Two forwards that would bind the same address: same port and same IP, or
/// one of them on the wildcard address of the same family. (Classic socat
/// failed to bind the second and ran half-configured; we refuse to start.)
fn check_overlaps(forwards: &[Forward]) -> Result<(), ConfigError> {
    for (i, a) in forwards.iter().enumerate() {
        for b in &forwards[..i] {
            let (la, lb) = (a.listen, b.listen);
            let clash = la.port() == lb.port()
                && la.is_ipv4() == lb.is_ipv4()
                && (la.ip() == lb.ip() || la.ip().is_unspecified() || lb.ip().is_unspecified());
            if clash {
                return Err(ConfigError(format!(
                    "{} and {} both listen on {} (port {}): remove one",
                    b.source,
                    a.source,
                    if la.ip().is_unspecified() { lb } else { la },
                    la.port()
                )));
            }
        }
    }
    Ok(())
}

/// The table `--check` prints.
pub fn table(settings: &Settings, skipped: &[Skipped]) -> String {
    let mut rows = vec![[
        "SOURCE".to_string(),
        "LISTEN".to_string(),
        "TARGET".to_string(),
        "PROTO".to_string(),
    ]];
    for f in &settings.forwards {
        rows.push([
            f.source.clone(),
            f.listen.to_string(),
            f.target.to_string(),
            f.proto.to_string(),
        ]);
    }
    let w: Vec<usize> = (0..4)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        out.push_str(
            format!(
                "{:w0$}  {:w1$}  {:w2$}  {}\n",
                r[0],
                r[1],
                r[2],
                r[3],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2]
            )
            .trim_end(),
        );
        out.push('\n');
    }
    for s in skipped {
        out.push_str(&format!("skipped {}: {}\n", s.var, s.why));
    }
    out
}
