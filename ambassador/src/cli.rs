//! The command line, and how it and the environment become [`Settings`].
//!
//! Forwards come from three sources, all combined: Docker link variables in
//! the environment (the classic image's only source; `--no-env` ignores
//! them), `--forward` flags, and the classic image's positional `HOST PORT`.
//! Any problem is one [`ConfigError`] line naming the variable or flag; the
//! binary prints it and exits with code 2.

use crate::balance::{Balance, PoolConfig};
use crate::config::env::{self, Skipped};
use crate::config::file::{self, FileConfig, Globals};
use crate::config::{Backends, Forward, LogFormat, Mode, Proto, Settings, SplicePolicy, parse};
use crate::discovery::Discovery;
use clap::Parser;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "ambassador",
    version,
    about = "Forward TCP ports for the Docker ambassador pattern, splicing in the kernel when it can.",
    after_help = "Classic usage: DB_PORT_6379_TCP=tcp://10.0.0.2:6379 ambassador\n\
                  (listens on 6379, the port in the variable's name, and forwards to 10.0.0.2:6379)\n\n\
                  Discovery: --forward 7000=etcd://127.0.0.1:2379/db takes the backends of service db\n\
                  from etcd; ambassador register --etcd URL --service NAME --address HOST:PORT [--ttl 10s]\n\
                  registers one (see ambassador register --help).\n\
                  --docker --forward 7000=docker://db follows the running containers labelled\n\
                  ambassador.service=db and ambassador.port=PORT."
)]
pub struct Cli {
    /// Forward: [LISTEN_ADDR:]PORT=HOST:PORT[,HOST:PORT…],
    /// [LISTEN_ADDR:]PORT=etcd://HOST:PORT/SERVICE or
    /// [LISTEN_ADDR:]PORT=docker://SERVICE (repeatable). IPv6 in brackets.
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

    /// Start even when an etcd forward's etcd cannot be reached: the forward
    /// has no backend until etcd answers (default: exit 2).
    #[arg(long)]
    pub etcd_start_empty: bool,

    /// TLS to etcd: the CA of etcd's certificate (PEM); turns on https for
    /// every etcd forward.
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<String>,

    /// TLS to etcd: this client's certificate (PEM), with --etcd-key.
    #[arg(long, value_name = "FILE")]
    pub etcd_cert: Option<String>,

    /// TLS to etcd: this client's private key (PEM), with --etcd-cert.
    #[arg(long, value_name = "FILE")]
    pub etcd_key: Option<String>,

    /// Follow Docker through this socket: docker://SERVICE forwards take the
    /// running containers labelled ambassador.service=SERVICE and
    /// ambassador.port=PORT.
    #[arg(long, value_name = "SOCKET", num_args = 0..=1,
          default_missing_value = crate::discovery::docker::DEFAULT_SOCKET)]
    pub docker: Option<String>,

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

    /// Worker threads, each with its own event loop: a number, or auto (the
    /// CPUs this process may run on: affinity and cgroup CPU quota).
    #[arg(
        long,
        default_value = "auto",
        value_name = "N|auto",
        env = "AMBASSADOR_WORKERS"
    )]
    pub workers: String,

    /// After SIGTERM/SIGINT, how long live connections may take to finish.
    #[arg(long, default_value = "30s", value_name = "DUR")]
    pub drain_timeout: String,

    /// How a forward with several backends spreads clients over them.
    #[arg(long, value_enum, default_value_t = Balance::RoundRobin)]
    pub balance: Balance,

    /// Passive health: consecutive connect failures that eject a backend.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub health_fails: u32,

    /// How long an ejected backend takes no connections (doubled after each
    /// failed trial).
    #[arg(long, default_value = "10s", value_name = "DUR")]
    pub health_backoff: String,

    /// The longest ejection.
    #[arg(long, default_value = "60s", value_name = "DUR")]
    pub health_backoff_max: String,

    /// Active TCP health checks: connect to every backend this often (off by default).
    #[arg(long, value_name = "DUR")]
    pub health_interval: Option<String>,

    /// Active checks: consecutive good checks that bring a down backend back.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub health_rise: u32,

    /// Active checks: consecutive failed checks that take a backend down.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub health_fall: u32,

    /// Serve /metrics (Prometheus), /healthz and /readyz on ADDR:PORT (off by default).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,

    /// Allow --metrics on a non-loopback address.
    #[arg(long)]
    pub metrics_public: bool,

    /// A TOML file with forwards and settings; flags and link variables add to it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<String>,

    /// Which flags were given (command line or environment), filled by
    /// [`Cli::mark_explicit`]: those win over the config file.
    #[arg(skip)]
    pub explicit: Vec<String>,

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
        let file = self.config_file()?;
        let pool = self.pool_config_over(file.as_ref())?;
        let mut forwards = Vec::new();
        let mut skipped = Vec::new();
        if !self.no_env {
            let scan = env::scan_os(vars).map_err(ConfigError)?;
            forwards.extend(scan.forwards);
            skipped = scan.skipped;
            for f in &mut forwards {
                f.pool = pool.clone();
            }
        }
        for f in &self.forwards {
            forwards.push(forward_flag(f, &pool)?);
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
                    target: target.into(),
                    proto: Proto::Tcp,
                    pool: pool.clone(),
                    discovery: None,
                });
            }
            [one] => {
                return Err(ConfigError(format!(
                    "HOST PORT arguments: got only {one:?}; expected a host and a port"
                )));
            }
            _ => unreachable!("clap limits positional arguments to 2"),
        }
        if let Some(file) = &file {
            forwards.extend(file.forwards.iter().map(|ff| Forward {
                pool: ff.pool.apply(&pool),
                ..ff.forward.clone()
            }));
        }
        if forwards.is_empty() {
            let mut msg = format!(
                "no forwards configured: looked for {}, --forward flags and HOST PORT arguments",
                env::LOOKED_FOR
            );
            if self.no_env {
                msg.push_str(" (environment ignored: --no-env)");
            }
            if let Some(path) = &self.config {
                msg.push_str(&format!(" (--config {path} has no [[forward]])"));
            }
            if !skipped.is_empty() {
                let names: Vec<&str> = skipped.iter().map(|s| s.var.as_str()).collect();
                msg.push_str(&format!("; skipped {}", names.join(", ")));
            }
            return Err(ConfigError(msg));
        }
        self.complete_discovery(&mut forwards, file.as_ref())?;
        check_overlaps(&forwards)?;
        let mut settings = Settings {
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
            workers: parse::workers(&self.workers)
                .map_err(|e| ConfigError(format!("--workers: {e}")))?,
        };
        if let Some(file) = &file {
            self.apply_file_globals(&mut settings, &file.globals);
        }
        Ok((settings, skipped))
    }
}

impl Cli {
    /// The discovery settings no URL carries (`--docker`, `--etcd-ca` …, or
    /// the file's `docker`, `etcd_*` keys; a flag wins), checked and given
    /// to every discovery forward.
    fn complete_discovery(
        &self,
        forwards: &mut [Forward],
        file: Option<&FileConfig>,
    ) -> Result<(), ConfigError> {
        let g = file.map(|f| &f.globals);
        let cfg = self.config.as_deref().unwrap_or("");
        let pick = |flag: &'static str, v: &Option<String>, fv: Option<&Option<String>>| match (
            v,
            fv.and_then(|f| f.as_ref()),
        ) {
            (Some(v), _) => (flag.to_string(), Some(v.clone())),
            (None, Some(f)) => (
                format!("--config {cfg}: {}", &flag[2..].replace('-', "_")),
                Some(f.clone()),
            ),
            (None, None) => (flag.to_string(), None),
        };
        let ca = pick("--etcd-ca", &self.etcd_ca, g.map(|g| &g.etcd_ca));
        let cert = pick("--etcd-cert", &self.etcd_cert, g.map(|g| &g.etcd_cert));
        let key = pick("--etcd-key", &self.etcd_key, g.map(|g| &g.etcd_key));
        let tls = crate::discovery::tls::Tls::new(
            crate::discovery::tls::Opt {
                flag: &ca.0,
                value: ca.1.as_deref(),
            },
            crate::discovery::tls::Opt {
                flag: &cert.0,
                value: cert.1.as_deref(),
            },
            crate::discovery::tls::Opt {
                flag: &key.0,
                value: key.1.as_deref(),
            },
        )
        .map_err(ConfigError)?;
        let docker = match &self.docker {
            Some(s) if s.is_empty() => {
                return Err(ConfigError("--docker: the socket path is empty".into()));
            }
            Some(s) => Some(s.clone()),
            None => g.and_then(|g| g.docker.clone()),
        };
        for f in forwards {
            if let Some(d) = &mut f.discovery {
                d.complete(docker.as_deref(), tls.as_ref())
                    .map_err(|e| ConfigError(format!("{}: {e}", f.source)))?;
            }
        }
        Ok(())
    }

    /// `--metrics` (loopback only unless `--metrics-public`).
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        crate::http::metrics_addr(self.metrics.as_deref(), self.metrics_public).map_err(ConfigError)
    }

    /// Remember which flags were given, so that they win over `--config`.
    pub fn mark_explicit(&mut self, m: &clap::ArgMatches) {
        use clap::parser::ValueSource;
        self.explicit = m
            .ids()
            .filter(|id| {
                matches!(
                    m.value_source(id.as_str()),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            })
            .map(|id| id.to_string())
            .collect();
    }

    fn given(&self, id: &str) -> bool {
        self.explicit.iter().any(|e| e == id)
    }

    /// Read `--config`, if given.
    pub fn config_file(&self) -> Result<Option<FileConfig>, ConfigError> {
        self.config
            .as_deref()
            .map(file::load)
            .transpose()
            .map_err(ConfigError)
    }

    /// The file's global settings, where no flag was given.
    fn apply_file_globals(&self, s: &mut Settings, g: &Globals) {
        if let Some(v) = g.mode
            && !self.given("mode")
        {
            s.mode = v;
        }
        if let Some(v) = g.splice
            && !self.given("splice")
        {
            s.splice = v;
        }
        if let Some(v) = g.nodelay
            && !self.given("no_nodelay")
        {
            s.nodelay = v;
        }
        if let Some(v) = g.connect_timeout
            && !self.given("connect_timeout")
        {
            s.connect_timeout = v;
        }
        if let Some(v) = g.idle_timeout
            && !self.given("idle_timeout")
        {
            s.idle_timeout = Some(v);
        }
        if let Some(v) = g.max_conns
            && !self.given("max_conns")
        {
            s.max_conns = v;
        }
        if let Some(v) = g.drain_timeout
            && !self.given("drain_timeout")
        {
            s.drain_timeout = v;
        }
        if let Some(v) = g.workers
            && !self.given("workers")
        {
            s.workers = v;
        }
    }

    /// The flags' pool settings over the file's global ones (a flag given
    /// explicitly wins), checked.
    fn pool_config_over(&self, file: Option<&FileConfig>) -> Result<PoolConfig, ConfigError> {
        let mut p = self.pool_config()?;
        if let Some(f) = file {
            let g = &f.globals.pool;
            let pick = |id: &str, v: bool| v && !self.given(id);
            if pick("balance", g.balance.is_some()) {
                p.balance = g.balance.unwrap();
            }
            if pick("health_fails", g.fails.is_some()) {
                p.fails = g.fails.unwrap();
            }
            if pick("health_backoff", g.backoff.is_some()) {
                p.backoff = g.backoff.unwrap();
            }
            if pick("health_backoff_max", g.backoff_max.is_some()) {
                p.backoff_max = g.backoff_max.unwrap();
            }
            if pick("health_interval", g.interval.is_some()) {
                p.interval = g.interval;
            }
            if pick("health_rise", g.rise.is_some()) {
                p.rise = g.rise.unwrap();
            }
            if pick("health_fall", g.fall.is_some()) {
                p.fall = g.fall.unwrap();
            }
            if p.backoff_max < p.backoff {
                return Err(ConfigError(format!(
                    "--config {}: health backoff_max {:?} is shorter than backoff {:?}",
                    self.config.as_deref().unwrap_or(""),
                    p.backoff_max,
                    p.backoff
                )));
            }
        }
        Ok(p)
    }

    /// `--balance` and the passive-health flags, as every flag-configured
    /// forward's [`PoolConfig`].
    pub fn pool_config(&self) -> Result<PoolConfig, ConfigError> {
        if self.health_fails == 0 {
            return Err(ConfigError("--health-fails: must be at least 1".into()));
        }
        let backoff = flag_duration("--health-backoff", &self.health_backoff, false)?;
        let backoff_max = flag_duration("--health-backoff-max", &self.health_backoff_max, false)?;
        if backoff_max < backoff {
            return Err(ConfigError(format!(
                "--health-backoff-max: {backoff_max:?} is shorter than --health-backoff {backoff:?}"
            )));
        }
        let interval = self
            .health_interval
            .as_deref()
            .map(|v| flag_duration("--health-interval", v, false))
            .transpose()?;
        if self.health_rise == 0 {
            return Err(ConfigError("--health-rise: must be at least 1".into()));
        }
        if self.health_fall == 0 {
            return Err(ConfigError("--health-fall: must be at least 1".into()));
        }
        Ok(PoolConfig {
            balance: self.balance,
            fails: self.health_fails,
            backoff,
            backoff_max,
            interval,
            rise: self.health_rise,
            fall: self.health_fall,
        })
    }
}

/// One `--forward` flag: `LISTEN=HOST:PORT[,…]` or `LISTEN=etcd://…/SERVICE`.
fn forward_flag(f: &str, pool: &PoolConfig) -> Result<Forward, ConfigError> {
    let (l, t) = parse::split_forward(f).map_err(|e| ConfigError(format!("--forward {f}: {e}")))?;
    let (listen, target, discovery) = if Discovery::is_url(t) {
        // The message names the listen side only: the URL could hold a
        // password (refused, and never repeated).
        let scheme = t.split_once("://").map_or("etcd", |(s, _)| s);
        let err = |e: String| ConfigError(format!("--forward {l}={scheme}://…: {e}"));
        let d = Discovery::parse(t).map_err(err)?;
        (
            parse::listen(l).map_err(err)?,
            Backends(Vec::new()),
            Some(d),
        )
    } else {
        let (listen, target) =
            parse::forward(f).map_err(|e| ConfigError(format!("--forward {f}: {e}")))?;
        (listen, target, None)
    };
    Ok(Forward {
        source: format!("--forward {f}"),
        listen,
        target,
        proto: Proto::Tcp,
        pool: pool.clone(),
        discovery,
    })
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

/// The settings line `--check` prints after the table when `--config` is
/// given (what the file and the flags combine to).
pub fn settings_line(s: &Settings) -> String {
    format!(
        "settings: mode={} connect_timeout={:?} idle_timeout={} max_conns={} drain_timeout={:?} nodelay={}\n",
        s.mode,
        s.connect_timeout,
        s.idle_timeout
            .map(|d| format!("{d:?}"))
            .unwrap_or_else(|| "none".into()),
        s.max_conns,
        s.drain_timeout,
        s.nodelay
    )
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
            f.target_display(),
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
    for f in settings.forwards.iter().filter(|f| f.target.len() > 1) {
        let p = &f.pool;
        out.push_str(&format!(
            "backends {}: {} over {}; ejected after {} connect failures for {:?} (doubling up to {:?}){}\n",
            f.source,
            p.balance,
            f.target.len(),
            p.fails,
            p.backoff,
            p.backoff_max,
            match p.interval {
                Some(i) => format!("; checked every {i:?} (rise {}, fall {})", p.rise, p.fall),
                None => String::new(),
            }
        ));
    }
    for s in skipped {
        out.push_str(&format!("skipped {}: {}\n", s.var, s.why));
    }
    out
}
