//! What the ambassador is asked to do, as plain types.
//!
//! A [`Forward`] is one listening address and the target it forwards to, with
//! the name of whatever configured it (a link variable, a `--forward` flag, or
//! the positional `HOST PORT` arguments) so that every log line and error can
//! point back at the user's own words. [`Settings`] holds the forwards and the
//! per-connection knobs shared by every engine.
//!
//! Parsing lives apart from these types: `config/env.rs` reads Docker link
//! variables, `config/parse.rs` reads flag values, `config/file.rs` reads
//! `--config` TOML files, and `cli.rs` ties them to the command line.

pub mod env;
pub mod file;
pub mod parse;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Where a forward connects to. A hostname is kept as a name and resolved
/// again for every connection, so a moved DNS name needs no restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

/// The upstream of a forward: host and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(ip) => write!(f, "{ip}:{}", self.port),
            Host::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

/// Transport protocol of a forward. Only TCP is served today; UDP link
/// variables are reported as skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("tcp")
    }
}

/// The backends of a forward: one or more targets, in the order written
/// (`db1:6379,db2:6379`). Never empty, except for a forward whose backends
/// come from etcd ([`Forward::discovery`]): there the set is what etcd says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backends(pub Vec<Target>);

impl Backends {
    pub fn iter(&self) -> std::slice::Iter<'_, Target> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Target> for Backends {
    fn from(t: Target) -> Self {
        Backends(vec![t])
    }
}

/// `db1:6379,db2:6379`, the way it is written on the command line.
impl fmt::Display for Backends {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

/// One listener and its backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    /// What configured it: `DB_PORT_6379_TCP`, `--forward 7000=db:6379`, `HOST PORT`.
    pub source: String,
    pub listen: SocketAddr,
    /// Where it connects: one or more backends (see [`crate::balance`]).
    pub target: Backends,
    pub proto: Proto,
    /// How the backends share clients and when one is ejected.
    pub pool: crate::balance::PoolConfig,
    /// `etcd://…/SERVICE`: the backends are read and watched there
    /// ([`crate::discovery`]); `target` is then empty.
    pub discovery: Option<crate::discovery::Discovery>,
}

impl Forward {
    /// Where it forwards, as written: the backends, or the etcd URL.
    pub fn target_display(&self) -> String {
        match &self.discovery {
            Some(d) => d.url.clone(),
            None => self.target.to_string(),
        }
    }
}

/// Which data path moves the bytes. See `engine.rs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The best engine that works here: sockmap, then uring, then epoll.
    Auto,
    /// In-kernel splicing with an eBPF sockmap program.
    Sockmap,
    /// An io_uring copy loop.
    Uring,
    /// A tokio (epoll) copy loop.
    Epoll,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Sockmap => "sockmap",
            Mode::Uring => "uring",
            Mode::Epoll => "epoll",
        })
    }
}

/// Which connections the sockmap engine hands to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SplicePolicy {
    /// Every connection is spliced in the kernel.
    Always,
    /// No connection is spliced (userspace copy, sockmap loaded but unused).
    Never,
    /// Splice the connections it pays off for (see the sockmap engine).
    Adaptive,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Everything the server and the engines need, after parsing.
#[derive(Clone, Debug)]
pub struct Settings {
    pub forwards: Vec<Forward>,
    pub mode: Mode,
    pub splice: SplicePolicy,
    /// Set TCP_NODELAY on both sockets of every connection.
    pub nodelay: bool,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// Connections at once per forward, across all workers; 0 = unlimited.
    pub max_conns: usize,
    pub drain_timeout: Duration,
    /// How many worker threads (runtimes) serve connections.
    pub workers: Workers,
}

/// `--workers N|auto`: how many worker threads, each with its own runtime
/// (and ring, for the uring engine). `auto` is decided at start-up by
/// [`crate::cpus::available`]: the CPUs this process may run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Workers {
    #[default]
    Auto,
    Count(usize),
}

impl std::fmt::Display for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workers::Auto => f.write_str("auto"),
            Workers::Count(n) => write!(f, "{n}"),
        }
    }
}
