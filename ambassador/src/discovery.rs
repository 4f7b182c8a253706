//! Discovery: a forward whose backends are registered in etcd (v3).
//!
//! `--forward 7000=etcd://127.0.0.1:2379/db` (or `backends =
//! ["etcd://127.0.0.1:2379/db"]` in the config file) asks etcd which
//! backends the service `db` has, instead of listing them. Each backend is
//! one key under the service's prefix, written by `ambassador register`
//! (see [`register`]) or by anything else that follows the same layout:
//!
//! ```text
//! /ambassador/services/<SERVICE>/<HOST:PORT>  =  <HOST:PORT>
//! ```
//!
//! The key's last part only keeps keys unique; the **value** is the
//! address. Each key is attached to a lease, so a registrar that dies
//! without saying so disappears after the lease's TTL.
//!
//! This module is the part that decides, without any I/O (and is
//! unit-tested): reading an `etcd://` URL ([`Discovery::parse`]), the key
//! layout, turning the keys under a prefix into a backend set ([`View`],
//! which skips a value that is not a `HOST:PORT` with one warning naming
//! the key, never half-parsing it), and when to log a lost or regained
//! connection ([`Link`]: once each way). The I/O is in `discovery/hub.rs`
//! (one thread, connection and watch of the root for every forward that
//! dials the same etcd; [`fanout`] decides which forward gets which set,
//! and each new set goes to the server's runtime, which applies it like a
//! reload that changed the forward's backends), `discovery/etcd.rs` (the
//! client, and starting watchers) and `discovery/register.rs`.
//!
//! A forward can also follow Docker instead (`docker://SERVICE`, with
//! `--docker [SOCKET]`): running containers labelled
//! `ambassador.service=SERVICE` and `ambassador.port=PORT` are its
//! backends. The decisions are in [`containers`], the I/O in
//! `discovery/docker.rs`; both send the same [`etcd::Update`] to the
//! server, so a Docker forward is reloaded, drained and logged like an
//! etcd one. TLS to etcd (client certificates) is [`tls`].

pub mod containers;
pub mod docker;
pub mod etcd;
pub mod fanout;
pub mod hub;
pub mod pages;
pub mod register;
pub mod tls;

use crate::config::{Target, parse};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Where the keys live: `/ambassador/services/<SERVICE>/`.
pub const ROOT: &str = "/ambassador/services/";

/// The prefix of a service's keys (with the trailing `/`, so that `db`
/// never sees the keys of `db2`).
pub fn prefix(service: &str) -> String {
    format!("{ROOT}{service}/")
}

/// The key a backend is registered under.
pub fn key(service: &str, address: &Target) -> String {
    format!("{}{address}", prefix(service))
}

/// Where a forward's backends come from.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Kind {
    /// etcd; `tls`: the client certificate settings (`--etcd-ca` …), if any.
    #[default]
    Etcd,
    /// Docker's events, through the socket in `endpoints[0]` (`--docker`).
    Docker,
}

/// A forward's discovery source: `etcd://HOST:PORT[,HOST:PORT…]/SERVICE`
/// or `docker://SERVICE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovery {
    /// As written (no credentials can be in it: they are refused).
    pub url: String,
    /// etcd: the client URLs to dial (`http://HOST:PORT`, `https://` with
    /// TLS). Docker: the socket's path (filled from `--docker`).
    pub endpoints: Vec<String>,
    pub service: String,
    pub kind: Kind,
    /// etcd over TLS: the files (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
    pub tls: Option<tls::Tls>,
}

impl Discovery {
    /// Is this backend spec a discovery source (rather than `HOST:PORT`)?
    pub fn is_url(s: &str) -> bool {
        s.starts_with("etcd://") || s.starts_with("docker://")
    }

    /// `etcd` or `docker`, for log lines.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Etcd => "etcd",
            Kind::Docker => "docker",
        }
    }

    /// `etcd://HOST:PORT[,HOST:PORT…]/SERVICE` or `docker://SERVICE`. The
    /// message never repeats the URL (the caller names the flag or key it
    /// came from).
    pub fn parse(s: &str) -> Result<Discovery, String> {
        if let Some(service) = s.strip_prefix("docker://") {
            service_name(service)?;
            return Ok(Discovery {
                url: s.to_string(),
                endpoints: Vec::new(),
                service: service.to_string(),
                kind: Kind::Docker,
                tls: None,
            });
        }
        let rest = s
            .strip_prefix("etcd://")
            .ok_or("expected etcd://HOST:PORT/SERVICE")?;
        let (hosts, service) = rest
            .split_once('/')
            .ok_or("expected etcd://HOST:PORT/SERVICE (no /SERVICE)")?;
        if hosts.contains('@') {
            return Err("credentials in the etcd URL are not supported".into());
        }
        let endpoints = endpoints(hosts)?;
        service_name(service)?;
        Ok(Discovery {
            url: s.to_string(),
            endpoints,
            service: service.to_string(),
            kind: Kind::Etcd,
            tls: None,
        })
    }

    /// Fill in the global settings a URL does not carry: the Docker socket
    /// (`--docker`), or etcd's TLS files (then every endpoint is dialled
    /// with `https://`). The error names what is missing.
    pub fn complete(&mut self, docker: Option<&str>, tls: Option<&tls::Tls>) -> Result<(), String> {
        match self.kind {
            Kind::Docker => {
                let socket = docker.ok_or(
                    "docker:// needs --docker [SOCKET] (or `docker = \"SOCKET\"` in the config file)",
                )?;
                self.endpoints = vec![socket.to_string()];
            }
            Kind::Etcd => {
                self.tls = tls.cloned();
                self.endpoints = with_scheme(&self.endpoints, tls.is_some())?;
            }
        }
        Ok(())
    }

    pub fn prefix(&self) -> String {
        prefix(&self.service)
    }
}

/// `HOST:PORT[,HOST:PORT…]` (optionally `http://`, `https://` or
/// `etcd://` before each) → the URLs to dial. `https://` is checked
/// against the TLS settings by [`with_scheme`].
pub fn endpoints(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.contains('@') {
            return Err("credentials in the etcd URL are not supported".into());
        }
        let (scheme, rest) = match part.strip_prefix("https://") {
            Some(r) => ("https", r),
            None => ("http", part),
        };
        let hp = rest
            .strip_prefix("http://")
            .or_else(|| rest.strip_prefix("etcd://"))
            .unwrap_or(rest)
            .trim_end_matches('/');
        let t = parse::target(hp).map_err(|e| format!("etcd endpoint: {e}"))?;
        out.push(format!("{scheme}://{t}"));
    }
    Ok(out)
}

/// The endpoints to dial: with TLS settings every one is `https://`;
/// without, an `https://` endpoint is an error (no CA to check etcd's
/// certificate against: the binary carries no root store).
pub fn with_scheme(endpoints: &[String], tls: bool) -> Result<Vec<String>, String> {
    endpoints
        .iter()
        .map(|e| match (e.strip_prefix("https://"), tls) {
            (Some(_), false) => Err(
                "an https:// etcd endpoint needs --etcd-ca (the CA of etcd's certificate)".into(),
            ),
            (Some(_), true) => Ok(e.clone()),
            (None, false) => Ok(e.clone()),
            (None, true) => Ok(format!("https://{}", e.trim_start_matches("http://"))),
        })
        .collect()
}

/// A service name: letters, digits, `.`, `_`, `-` (it is a key segment).
pub fn service_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("the service name is empty".into());
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "service name {s:?} may only have letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// A key whose value was skipped, and why (logged once per value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub key: String,
    pub why: String,
}

/// The keys under one prefix as last seen, and the backend set they make.
///
/// [`View::reset`] loads a fresh read, [`View::put`] / [`View::delete`]
/// apply watch events; [`View::backends`] is the set (ordered by key, each
/// address once) plus the values newly found bad — a bad value is reported
/// once, not again at every event or resync while it stays the same.
#[derive(Debug, Default)]
pub struct View {
    kvs: BTreeMap<Vec<u8>, Vec<u8>>,
    reported: BTreeSet<(Vec<u8>, Vec<u8>)>,
}

impl View {
    pub fn reset(&mut self, kvs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) {
        self.kvs = kvs.into_iter().collect();
    }

    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.kvs.insert(key, value);
    }

    pub fn delete(&mut self, key: &[u8]) {
        self.kvs.remove(key);
    }

    /// No key left.
    pub fn is_empty(&self) -> bool {
        self.kvs.is_empty()
    }

    pub fn backends(&mut self) -> (Vec<Target>, Vec<Skipped>) {
        let mut set: Vec<Target> = Vec::new();
        let mut skipped = Vec::new();
        for (k, v) in &self.kvs {
            match backend(v) {
                Ok(t) if !set.contains(&t) => set.push(t),
                Ok(_) => {}
                Err(why) => {
                    if self.reported.insert((k.clone(), v.clone())) {
                        skipped.push(Skipped {
                            key: String::from_utf8_lossy(k).into_owned(),
                            why,
                        });
                    }
                }
            }
        }
        // Forget reports of values that are gone, so a bad value written
        // again later is reported again.
        let kvs = &self.kvs;
        self.reported.retain(|(k, v)| kvs.get(k) == Some(v));
        (set, skipped)
    }
}

/// A value → a backend: exactly `HOST:PORT` (surrounding whitespace, like
/// the newline of `echo`, aside), or the reason it is not one.
fn backend(value: &[u8]) -> Result<Target, String> {
    let s = std::str::from_utf8(value).map_err(|_| "value is not valid UTF-8".to_string())?;
    parse::target(s.trim()).map_err(|e| format!("value is not HOST:PORT: {e}"))
}

/// The connection to etcd as the log tells it: `lost` once when it goes,
/// `back` once when it returns, nothing for the retries in between.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum Link {
    /// Never connected yet.
    #[default]
    New,
    Up,
    Lost,
}

impl Link {
    /// A session worked; true: log that etcd is back.
    pub fn up(&mut self) -> bool {
        std::mem::replace(self, Link::Up) == Link::Lost
    }

    /// A session failed; true: log that etcd was lost.
    pub fn lost(&mut self) -> bool {
        std::mem::replace(self, Link::Lost) != Link::Lost
    }
}

/// Reconnect back-off: 250 ms doubling to 4 s, reset by a good session.
#[derive(Debug)]
pub struct Backoff(Duration);

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(250);
    pub const MAX: Duration = Duration::from_secs(4);

    pub fn new() -> Backoff {
        Backoff(Self::FIRST)
    }

    pub fn wait(&mut self) -> Duration {
        let d = self.0;
        self.0 = (d * 2).min(Self::MAX);
        d
    }

    pub fn reset(&mut self) {
        self.0 = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
        (k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    #[test]
    fn urls() {
        let d = Discovery::parse("etcd://127.0.0.1:2379/db").unwrap();
        assert_eq!(d.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(d.service, "db");
        assert_eq!(d.prefix(), "/ambassador/services/db/");
        let d = Discovery::parse("etcd://e1:2379,[::1]:2379/db-2").unwrap();
        assert_eq!(d.endpoints, ["http://e1:2379", "http://[::1]:2379"]);
        assert!(Discovery::parse("etcd://127.0.0.1:2379").is_err());
        assert!(Discovery::parse("etcd://127.0.0.1:2379/").is_err());
        assert!(Discovery::parse("etcd://127.0.0.1/db").is_err());
        assert!(Discovery::parse("etcd://127.0.0.1:2379/a/b").is_err());
        let e = Discovery::parse("etcd://user:secret@h:2379/db").unwrap_err();
        assert!(e.contains("credentials") && !e.contains("secret"), "{e}");
        assert!(Discovery::is_url("etcd://x"));
        assert!(!Discovery::is_url("db:6379"));
        assert_eq!(endpoints("http://h:1/").unwrap(), ["http://h:1"]);
        assert_eq!(endpoints("https://h:1").unwrap(), ["https://h:1"]);
        assert!(with_scheme(&endpoints("https://h:1").unwrap(), false).is_err());
        assert_eq!(
            with_scheme(&endpoints("h:1,https://h:2").unwrap(), true).unwrap(),
            ["https://h:1", "https://h:2"]
        );
        let d = Discovery::parse("docker://db").unwrap();
        assert_eq!((d.kind.clone(), d.service.as_str()), (Kind::Docker, "db"));
        assert!(Discovery::parse("docker://").is_err());
        assert!(Discovery::parse("docker://a/b").is_err());
        let mut d2 = d.clone();
        assert!(d2.complete(None, None).unwrap_err().contains("--docker"));
        d2.complete(Some("/run/d.sock"), None).unwrap();
        assert_eq!(d2.endpoints, ["/run/d.sock"]);
    }

    #[test]
    fn keys() {
        let t = parse::target("10.0.0.2:6379").unwrap();
        assert_eq!(key("db", &t), "/ambassador/services/db/10.0.0.2:6379");
    }

    #[test]
    fn a_view_is_the_set_of_good_values() {
        let mut v = View::default();
        v.reset([
            kv("/p/b", "10.0.0.2:6379"),
            kv("/p/a", "10.0.0.1:6379"),
            kv("/p/dup", "10.0.0.1:6379"),
            kv("/p/bad", "10.0.0.3"),
        ]);
        let (set, skipped) = v.backends();
        let s: Vec<String> = set.iter().map(|t| t.to_string()).collect();
        assert_eq!(s, ["10.0.0.1:6379", "10.0.0.2:6379"]);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].key, "/p/bad");
        // The same bad value is reported once.
        assert!(v.backends().1.is_empty());
        v.put(b"/p/c".to_vec(), b" db:1\n".to_vec());
        v.delete(b"/p/a");
        let (set, skipped) = v.backends();
        let s: Vec<String> = set.iter().map(|t| t.to_string()).collect();
        assert_eq!(s, ["10.0.0.2:6379", "db:1", "10.0.0.1:6379"]);
        assert!(skipped.is_empty());
        // Written again after it was fixed: reported again.
        v.put(b"/p/bad".to_vec(), b"10.0.0.3:1".to_vec());
        assert!(v.backends().1.is_empty());
        v.put(b"/p/bad".to_vec(), b"nope".to_vec());
        assert_eq!(v.backends().1.len(), 1);
    }

    #[test]
    fn bad_values_are_never_half_parsed() {
        for bad in [
            "10.0.0.1:6379x",
            "10.0.0.1:6379,10.0.0.2:6379",
            "300.0.0.1:1",
            "::1:80",
            "",
            "h:0",
        ] {
            assert!(backend(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(backend(&[0xff, b':', b'1']).is_err());
        assert_eq!(backend(b"[::1]:80").unwrap().to_string(), "[::1]:80");
    }

    #[test]
    fn link_logs_once_each_way() {
        let mut l = Link::default();
        assert!(!l.up(), "the first connect is not a return");
        assert!(l.lost());
        assert!(!l.lost());
        assert!(!l.lost());
        assert!(l.up());
        assert!(!l.up());
        let mut never = Link::default();
        assert!(never.lost(), "a first connect that fails is logged");
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let mut b = Backoff::new();
        let v: Vec<u64> = (0..6).map(|_| b.wait().as_millis() as u64).collect();
        assert_eq!(v, [250, 500, 1000, 2000, 4000, 4000]);
        b.reset();
        assert_eq!(b.wait(), Backoff::FIRST);
    }
}
