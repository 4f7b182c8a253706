//! `--config FILE`: the forwards and settings in a TOML file.
//!
//! ```toml
//! connect_timeout = "2s"      # any flag's setting: idle_timeout, max_conns,
//! balance = "least-conn"      # drain_timeout, nodelay, mode, splice, workers
//!
//! [health]                    # health, for every forward
//! fails = 3                   # passive: connect failures that eject
//! backoff = "10s"
//! backoff_max = "1m"
//! interval = "2s"             # active TCP checks (absent: none)
//! rise = 2
//! fall = 3
//!
//! [[forward]]
//! name = "redis"              # optional; shown as the forward's source
//! listen = "127.0.0.1:6379"   # or a port: 6379 (all IPv4 addresses)
//! backends = ["db1:6379", "db2:6379"]   # or ["etcd://127.0.0.1:2379/db"]
//! balance = "round-robin"     # optional: this forward only
//! health = { fails = 2 }      # optional: this forward only
//! ```
//!
//! Reading is two steps. `serde` + `toml` turn the text into the `*Doc`
//! structs below, keeping each value's byte span ([`Spanned`]); unknown keys
//! are refused. Then every value is checked with the same parsers the flags
//! use (`config::parse`). Any problem is one line `FILE:LINE: KEY: what`,
//! the line found from the span, so the user is pointed at their own words.
//!
//! How the file combines with the rest: link variables and `--forward`
//! flags add forwards to the file's; a setting given as a flag (on the
//! command line or in its environment variable) wins over the file's
//! global setting; a forward's own `balance`/`health` win over both.

use super::{Backends, Forward, Mode, Proto, SplicePolicy, Workers, parse};
use crate::balance::{Balance, PoolConfig};
use crate::discovery::Discovery;
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::time::Duration;
use toml::Spanned;

/// `workers`: a number or `"auto"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum WorkersDoc {
    Count(i64),
    Name(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    mode: Option<Spanned<String>>,
    splice: Option<Spanned<String>>,
    nodelay: Option<bool>,
    connect_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_conns: Option<usize>,
    drain_timeout: Option<Spanned<String>>,
    /// `workers = 2` or `workers = "auto"`.
    workers: Option<Spanned<WorkersDoc>>,
    balance: Option<Spanned<String>>,
    health: Option<HealthDoc>,
    docker: Option<Spanned<String>>,
    etcd_ca: Option<Spanned<String>>,
    etcd_cert: Option<Spanned<String>>,
    etcd_key: Option<Spanned<String>>,
    #[serde(default)]
    forward: Vec<Spanned<ForwardDoc>>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct HealthDoc {
    fails: Option<Spanned<u32>>,
    backoff: Option<Spanned<String>>,
    backoff_max: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardDoc {
    name: Option<Spanned<String>>,
    listen: Spanned<toml::Value>,
    backends: Spanned<Vec<Spanned<String>>>,
    balance: Option<Spanned<String>>,
    health: Option<HealthDoc>,
}

/// Balancing and health settings given in the file (each optional).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolOverride {
    pub balance: Option<Balance>,
    pub fails: Option<u32>,
    pub backoff: Option<Duration>,
    pub backoff_max: Option<Duration>,
    pub interval: Option<Duration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

impl PoolOverride {
    /// `base` with the values set here.
    pub fn apply(&self, base: &PoolConfig) -> PoolConfig {
        PoolConfig {
            balance: self.balance.unwrap_or(base.balance),
            fails: self.fails.unwrap_or(base.fails),
            backoff: self.backoff.unwrap_or(base.backoff),
            backoff_max: self.backoff_max.unwrap_or(base.backoff_max),
            interval: self.interval.or(base.interval),
            rise: self.rise.unwrap_or(base.rise),
            fall: self.fall.unwrap_or(base.fall),
        }
    }
}

/// The file's global settings; `None` = not in the file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Globals {
    pub mode: Option<Mode>,
    pub splice: Option<SplicePolicy>,
    pub nodelay: Option<bool>,
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub max_conns: Option<usize>,
    pub drain_timeout: Option<Duration>,
    pub workers: Option<Workers>,
    pub pool: PoolOverride,
    /// `docker = "SOCKET"`: the socket `docker://` forwards follow.
    pub docker: Option<String>,
    /// `etcd_ca`, `etcd_cert`, `etcd_key`: TLS to etcd (paths, as written;
    /// checked with the flags, see `discovery::tls`).
    pub etcd_ca: Option<String>,
    pub etcd_cert: Option<String>,
    pub etcd_key: Option<String>,
}

/// A forward from the file and its own balancing/health settings.
#[derive(Clone, Debug)]
pub struct FileForward {
    pub forward: Forward,
    pub pool: PoolOverride,
}

/// What a config file says.
#[derive(Clone, Debug)]
pub struct FileConfig {
    pub globals: Globals,
    pub forwards: Vec<FileForward>,
}

/// Read and check `path`. The error is one line naming the file, line and key.
pub fn load(path: &str) -> Result<FileConfig, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--config {path}: cannot read: {e}"))?;
    parse_str(path, &text)
}

/// Where a problem is: `FILE:LINE: KEY: ` (span → line).
struct At<'a> {
    file: &'a str,
    text: &'a str,
}

impl At<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text[..end].bytes().filter(|&b| b == b'\n').count() + 1
    }

    fn err(&self, span: &Range<usize>, key: &str, msg: impl std::fmt::Display) -> String {
        format!("{}:{}: {key}: {msg}", self.file, self.line(span))
    }

    fn duration(&self, key: &str, v: &Spanned<String>) -> Result<Duration, String> {
        parse::duration(v.get_ref()).map_err(|e| self.err(&v.span(), key, e))
    }

    fn enum_value<T: clap::ValueEnum>(&self, key: &str, v: &Spanned<String>) -> Result<T, String> {
        T::from_str(v.get_ref(), false).map_err(|_| {
            let names: Vec<String> = T::value_variants()
                .iter()
                .filter_map(|x| x.to_possible_value().map(|p| p.get_name().to_string()))
                .collect();
            self.err(
                &v.span(),
                key,
                format!("{:?} is not one of {}", v.get_ref(), names.join(", ")),
            )
        })
    }

    fn pool(
        &self,
        prefix: &str,
        balance: Option<&Spanned<String>>,
        health: Option<&HealthDoc>,
    ) -> Result<PoolOverride, String> {
        let mut o = PoolOverride::default();
        if let Some(b) = balance {
            o.balance = Some(self.enum_value(&format!("{prefix}balance"), b)?);
        }
        if let Some(h) = health {
            if let Some(f) = &h.fails {
                if *f.get_ref() == 0 {
                    return Err(self.err(
                        &f.span(),
                        &format!("{prefix}health.fails"),
                        "must be at least 1",
                    ));
                }
                o.fails = Some(*f.get_ref());
            }
            if let Some(b) = &h.backoff {
                let key = format!("{prefix}health.backoff");
                let d = self.duration(&key, b)?;
                if d.is_zero() {
                    return Err(self.err(&b.span(), &key, "must be more than 0"));
                }
                o.backoff = Some(d);
            }
            if let Some(b) = &h.backoff_max {
                o.backoff_max = Some(self.duration(&format!("{prefix}health.backoff_max"), b)?);
            }
            if let Some(b) = &h.interval {
                let key = format!("{prefix}health.interval");
                let d = self.duration(&key, b)?;
                if d.is_zero() {
                    return Err(self.err(&b.span(), &key, "must be more than 0"));
                }
                o.interval = Some(d);
            }
            for (name, v, slot) in [
                ("rise", &h.rise, &mut o.rise),
                ("fall", &h.fall, &mut o.fall),
            ] {
                if let Some(n) = v {
                    if *n.get_ref() == 0 {
                        let key = format!("{prefix}health.{name}");
                        return Err(self.err(&n.span(), &key, "must be at least 1"));
                    }
                    *slot = Some(*n.get_ref());
                }
            }
        }
        Ok(o)
    }
}

/// Parse the text of a config file named `file` (for messages).
pub fn parse_str(file: &str, text: &str) -> Result<FileConfig, String> {
    let at = At { file, text };
    let doc: FileDoc = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        // The key is what the span covers when it is a key, else the key
        // written before `=` on that line.
        let line_no = at.line(&span);
        let line = text.lines().nth(line_no - 1).unwrap_or("");
        let key = match line.split_once('=') {
            Some((k, _)) => k.trim().trim_matches('"').to_string(),
            None => line.trim().to_string(),
        };
        let msg = e.message().replace('\n', " ");
        format!("{file}:{line_no}: {key}: {}", msg.trim())
    })?;

    let mut g = Globals {
        nodelay: doc.nodelay,
        max_conns: doc.max_conns,
        etcd_ca: doc.etcd_ca.as_ref().map(|v| v.get_ref().clone()),
        etcd_cert: doc.etcd_cert.as_ref().map(|v| v.get_ref().clone()),
        etcd_key: doc.etcd_key.as_ref().map(|v| v.get_ref().clone()),
        ..Globals::default()
    };
    if let Some(v) = &doc.docker {
        if v.get_ref().is_empty() {
            return Err(at.err(&v.span(), "docker", "the socket path is empty"));
        }
        g.docker = Some(v.get_ref().clone());
    }
    if let Some(v) = &doc.mode {
        g.mode = Some(at.enum_value("mode", v)?);
    }
    if let Some(v) = &doc.splice {
        g.splice = Some(at.enum_value("splice", v)?);
    }
    if let Some(v) = &doc.connect_timeout {
        let d = at.duration("connect_timeout", v)?;
        if d.is_zero() {
            return Err(at.err(&v.span(), "connect_timeout", "must be more than 0"));
        }
        g.connect_timeout = Some(d);
    }
    if let Some(v) = &doc.idle_timeout {
        g.idle_timeout = Some(at.duration("idle_timeout", v)?);
    }
    if let Some(v) = &doc.drain_timeout {
        g.drain_timeout = Some(at.duration("drain_timeout", v)?);
    }
    if let Some(v) = &doc.workers {
        let text = match v.get_ref() {
            WorkersDoc::Count(n) => n.to_string(),
            WorkersDoc::Name(s) => s.clone(),
        };
        g.workers = Some(parse::workers(&text).map_err(|e| at.err(&v.span(), "workers", e))?);
    }
    g.pool = at.pool("", doc.balance.as_ref(), doc.health.as_ref())?;

    let mut forwards = Vec::new();
    for (i, fwd) in doc.forward.iter().enumerate() {
        let f = fwd.get_ref();
        let prefix = format!("forward[{i}].");
        let key = |k: &str| format!("{prefix}{k}");
        let listen = match f.listen.get_ref() {
            toml::Value::Integer(n) => {
                let p = parse::port(&n.to_string())
                    .map_err(|e| at.err(&f.listen.span(), &key("listen"), e))?;
                SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), p)
            }
            toml::Value::String(s) => {
                listen_addr(s).map_err(|e| at.err(&f.listen.span(), &key("listen"), e))?
            }
            _ => {
                return Err(at.err(
                    &f.listen.span(),
                    &key("listen"),
                    "expected \"ADDR:PORT\" or a port number",
                ));
            }
        };
        if f.backends.get_ref().is_empty() {
            return Err(at.err(&f.backends.span(), &key("backends"), "needs at least one"));
        }
        let mut targets = Vec::new();
        let mut discovery = None;
        for (j, b) in f.backends.get_ref().iter().enumerate() {
            if Discovery::is_url(b.get_ref()) {
                let k = format!("{prefix}backends[{j}]");
                if f.backends.get_ref().len() > 1 {
                    return Err(at.err(
                        &b.span(),
                        &k,
                        "an etcd:// or docker:// source must be the only backend",
                    ));
                }
                discovery =
                    Some(Discovery::parse(b.get_ref()).map_err(|e| at.err(&b.span(), &k, e))?);
                continue;
            }
            let k = format!("{prefix}backends[{j}]");
            let t = parse::target(b.get_ref()).map_err(|e| at.err(&b.span(), &k, e))?;
            if targets.contains(&t) {
                return Err(at.err(&b.span(), &k, format!("backend {t} is listed twice")));
            }
            targets.push(t);
        }
        let pool = at.pool(&prefix, f.balance.as_ref(), f.health.as_ref())?;
        let label = match &f.name {
            Some(n) => n.get_ref().clone(),
            None => listen.to_string(),
        };
        forwards.push(FileForward {
            forward: Forward {
                source: format!("{file}[{label}]"),
                listen,
                target: Backends(targets),
                proto: Proto::Tcp,
                pool: PoolConfig::default(),
                discovery,
            },
            pool,
        });
    }
    Ok(FileConfig {
        globals: g,
        forwards,
    })
}

/// `ADDR:PORT`, `[V6]:PORT` or `PORT` (all IPv4 addresses).
fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    if !s.contains(':') {
        return Ok(SocketAddr::new(
            Ipv4Addr::UNSPECIFIED.into(),
            parse::port(s)?,
        ));
    }
    let (ip, port) = match s.strip_prefix('[') {
        Some(rest) => rest
            .split_once("]:")
            .ok_or_else(|| format!("{s:?}: expected [IPV6]:PORT"))?,
        None => s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: expected ADDR:PORT"))?,
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("listen address {ip:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, parse::port(port)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
connect_timeout = "2s"
idle_timeout = "5m"
max_conns = 100
balance = "least-conn"

[health]
fails = 4
backoff = "5s"
interval = "1s"
rise = 3

[[forward]]
name = "redis"
listen = "127.0.0.1:7000"
backends = ["db1:6379", "db2:6379"]
health = { fails = 2 }

[[forward]]
listen = 5432
backends = ["[::1]:5432"]
balance = "round-robin"
"#;

    #[test]
    fn an_etcd_forward() {
        let ok = "[[forward]]\nlisten = 7000\nbackends = [\"etcd://127.0.0.1:2379/db\"]\n";
        let c = parse_str("amb.toml", ok).unwrap();
        let f = &c.forwards[0].forward;
        assert!(f.target.is_empty());
        assert_eq!(f.discovery.as_ref().unwrap().service, "db");
        let mixed = "[[forward]]\nlisten = 7000\nbackends = [\"etcd://h:1/db\", \"x:1\"]\n";
        let e = parse_str("amb.toml", mixed).unwrap_err();
        assert!(e.starts_with("amb.toml:3: forward[0].backends[0]:"), "{e}");
        assert!(e.contains("only backend"), "{e}");
        let bad = "[[forward]]\nlisten = 7000\nbackends = [\"etcd://h/db\"]\n";
        let e = parse_str("amb.toml", bad).unwrap_err();
        assert!(e.starts_with("amb.toml:3: forward[0].backends[0]:"), "{e}");
    }

    #[test]
    fn a_full_file() {
        let c = parse_str("amb.toml", FULL).unwrap();
        assert_eq!(c.globals.connect_timeout, Some(Duration::from_secs(2)));
        assert_eq!(c.globals.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(c.globals.max_conns, Some(100));
        assert_eq!(c.globals.drain_timeout, None);
        assert_eq!(c.globals.pool.balance, Some(Balance::LeastConn));
        assert_eq!(c.forwards.len(), 2);
        let r = &c.forwards[0];
        assert_eq!(r.forward.source, "amb.toml[redis]");
        assert_eq!(r.forward.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(r.forward.target.to_string(), "db1:6379,db2:6379");
        // Forward's own setting over the file's global over the flags'.
        let flags = PoolConfig::default();
        let base = c.globals.pool.apply(&flags);
        let p = r.pool.apply(&base);
        assert_eq!(
            (p.balance, p.fails, p.backoff),
            (Balance::LeastConn, 2, Duration::from_secs(5))
        );
        let p = c.forwards[1].pool.apply(&base);
        assert_eq!((p.balance, p.fails), (Balance::RoundRobin, 4));
        assert_eq!(
            (p.interval, p.rise, p.fall),
            (Some(Duration::from_secs(1)), 3, 3)
        );
        assert_eq!(c.forwards[1].forward.listen.to_string(), "0.0.0.0:5432");
        assert_eq!(c.forwards[1].forward.source, "amb.toml[0.0.0.0:5432]");
    }

    fn err(text: &str) -> String {
        let e = parse_str("amb.toml", text).unwrap_err();
        assert_eq!(e.lines().count(), 1, "one line: {e}");
        eprintln!("{e}");
        e
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = err("connect_timeout = \"2s\"\nidle_timeout = \"soon\"\n");
        assert!(e.starts_with("amb.toml:2: idle_timeout: "), "{e}");
        let e = err("[[forward]]\nlisten = 7000\nbackends = [\"db:1\", \"db:0\"]\n");
        assert!(e.starts_with("amb.toml:3: forward[0].backends[1]: "), "{e}");
        assert!(e.contains("out of range"), "{e}");
        let e = err("[[forward]]\nlisten = 7000\nbackends = [\"db:1\"]\nbalanse = \"x\"\n");
        assert!(e.starts_with("amb.toml:4: balanse: "), "{e}");
        assert!(e.contains("unknown field"), "{e}");
        let e = err("[[forward]]\nlisten = 7000\n");
        assert!(e.starts_with("amb.toml:1: "), "{e}");
        assert!(e.contains("backends"), "{e}");
        let e = err("balance = \"random\"\n");
        assert!(e.starts_with("amb.toml:1: balance: "), "{e}");
        assert!(e.contains("round-robin, least-conn"), "{e}");
        let e = err("max_conns = -1\n");
        assert!(e.starts_with("amb.toml:1: max_conns: "), "{e}");
        let e = err("[[forward]]\nlisten = \"localhost:1\"\nbackends = [\"a:1\"]\n");
        assert!(e.starts_with("amb.toml:2: forward[0].listen: "), "{e}");
        let e = err("x = [\n");
        assert!(e.starts_with("amb.toml:"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        eprintln!("{e}");
    }

    #[test]
    fn workers_is_a_number_or_auto() {
        let w = |t: &str| parse_str("amb.toml", t).unwrap().globals.workers;
        assert_eq!(w("workers = 3\n"), Some(Workers::Count(3)));
        assert_eq!(w("workers = \"auto\"\n"), Some(Workers::Auto));
        assert_eq!(w(""), None);
        let e = err("connect_timeout = \"2s\"\nworkers = 0\n");
        assert!(e.starts_with("amb.toml:2: workers: "), "{e}");
        let e = err("workers = \"many\"\n");
        assert!(e.starts_with("amb.toml:1: workers: "), "{e}");
    }
}
