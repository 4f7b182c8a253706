//! Forwarding loops: a forward whose target is the ambassador itself.
//!
//! `--forward 7000=127.0.0.1:7000` would accept a client, connect to
//! itself, accept that connection, connect again, … until the process runs
//! out of file descriptors. Two checks stop that:
//!
//! - **At start-up** ([`check_startup`]): a forward whose target is its own
//!   listen address is bad input (exit 2, naming the forward). The target is
//!   resolved for this check only: literal IPs as they are, `localhost` (and
//!   `*.localhost`) as loopback without asking anyone, other names with one
//!   `getaddrinfo` each, bounded in time, and a name that does not resolve
//!   now is not an error (it is resolved again for every connection). A
//!   wildcard listener (`0.0.0.0:7000`) is reached through any local
//!   address, so a target on any local address and the same port is a loop
//!   too. The local addresses are loopback and the interfaces' addresses
//!   (`getifaddrs(3)`, read once). Chains
//!   between forwards (`A → B`, `B → real upstream`) are allowed; a cycle
//!   between forwards is left to the run-time check.
//!
//! - **At run time** ([`OwnUpstreams`]): every upstream socket's local
//!   address and destination are recorded the moment `connect(2)` is
//!   issued (with the table locked across the call: the accept loops and
//!   the connects run on different worker threads), and forgotten when the
//!   socket closes. When an accept loop accepts a client whose address is
//!   one of those local addresses, and which arrived at that socket's
//!   destination (the same TCP four-tuple: nothing else can have it), that
//!   client is ourselves: it is reset at once, without connecting anywhere
//!   (so the loop ends after one hop, whatever DNS said), an error is counted
//!   on the forward that made the connection, and one warning is logged per
//!   forward per episode (an episode ends when that forward next completes
//!   a connection that did not loop). The originating connection then sees
//!   the reset and resets its own client, quietly: the warning is the one
//!   line for it.

use crate::config::{Forward, Host};
use crate::metrics::ForwardStats;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long start-up waits, in total, for names to resolve for the check.
const RESOLVE_BUDGET: Duration = Duration::from_secs(1);

/// Refuse a forward whose target is its own listen address. Err is the
/// one-line message (exit code 2).
pub fn check_startup(forwards: &[Forward]) -> Result<(), String> {
    let mut names: Vec<(String, u16)> = forwards
        .iter()
        .flat_map(|f| f.target.iter())
        .filter_map(|t| match &t.host {
            Host::Name(n) if !is_localhost(n) => Some((n.clone(), t.port)),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    let resolved = resolve_bounded(&names, RESOLVE_BUDGET);
    let interfaces = interface_addresses();
    let is_local = |ip: IpAddr| ip.is_loopback() || ip.is_unspecified() || interfaces.contains(&ip);
    for f in forwards {
        // Every backend of the forward is checked.
        for t in f.target.iter() {
            let addrs = match &t.host {
                Host::Ip(ip) => vec![SocketAddr::new(*ip, t.port)],
                Host::Name(n) if is_localhost(n) => vec![
                    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), t.port),
                    SocketAddr::new(Ipv6Addr::LOCALHOST.into(), t.port),
                ],
                Host::Name(n) => resolved
                    .get(&(n.clone(), t.port))
                    .cloned()
                    .unwrap_or_default(),
            };
            if let Some(hit) = loops_to_itself(f.listen, &addrs, is_local) {
                let via = match &t.host {
                    Host::Name(_) => format!(" (resolves to {})", hit.ip()),
                    Host::Ip(_) => String::new(),
                };
                return Err(format!(
                    "{}: the target {t}{via} reaches this forward's own listener {}: \
                     it would connect to itself in a loop",
                    f.source, f.listen
                ));
            }
        }
    }
    Ok(())
}

/// The first of `targets` that reaches the listener on `listen`, if any.
/// A pure decision: `is_local` says whether an address belongs to this host.
pub fn loops_to_itself(
    listen: SocketAddr,
    targets: &[SocketAddr],
    is_local: impl Fn(IpAddr) -> bool,
) -> Option<SocketAddr> {
    targets.iter().copied().find(|t| {
        t.port() == listen.port()
            && t.is_ipv4() == listen.is_ipv4()
            && (t.ip() == listen.ip() || (listen.ip().is_unspecified() && is_local(t.ip())))
    })
}

/// `localhost` and `*.localhost` are loopback by definition (RFC 6761).
fn is_localhost(name: &str) -> bool {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    n == "localhost" || n.ends_with(".localhost")
}

/// The IP addresses of this host's interfaces (none if they cannot be
/// read: the check then knows only loopback).
fn interface_addresses() -> Vec<IpAddr> {
    let Ok(list) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    list.filter_map(|i| {
        let a = i.address?;
        a.as_sockaddr_in()
            .map(|v4| IpAddr::V4(v4.ip()))
            .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
    })
    .collect()
}

/// Resolve each (name, port) once, in parallel, waiting at most `budget`
/// in total. Names that fail or take longer are left out.
fn resolve_bounded(
    names: &[(String, u16)],
    budget: Duration,
) -> HashMap<(String, u16), Vec<SocketAddr>> {
    let (tx, rx) = std::sync::mpsc::channel();
    for key in names {
        let (tx, key) = (tx.clone(), key.clone());
        std::thread::spawn(move || {
            let addrs: Vec<SocketAddr> = (key.0.as_str(), key.1)
                .to_socket_addrs()
                .map(|a| a.collect())
                .unwrap_or_default();
            let _ = tx.send((key, addrs));
        });
    }
    drop(tx);
    let deadline = Instant::now() + budget;
    let mut out = HashMap::new();
    while out.len() < names.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((key, addrs)) => {
                out.insert(key, addrs);
            }
            Err(_) => break,
        }
    }
    out
}

/// The forward an upstream socket belongs to, for the loop check.
#[derive(Clone)]
pub struct Origin {
    pub source: Arc<str>,
    pub stats: Arc<ForwardStats>,
    /// Shared by all connections of the forward: a loop warning was logged
    /// and no connection has completed without looping since.
    pub episode: Arc<AtomicBool>,
}

struct Entry {
    /// Where the socket connects to.
    remote: SocketAddr,
    origin: Origin,
    looped: Arc<AtomicBool>,
}

/// The upstream sockets this process has open, by local address. A local
/// address alone does not identify a socket (the kernel gives the same
/// ephemeral port to connections to different destinations), so a match
/// also needs the other end: the accepted socket's own address must be the
/// upstream socket's destination.
#[derive(Default)]
pub struct OwnUpstreams {
    by_local: Mutex<HashMap<SocketAddr, Vec<Entry>>>,
}

impl OwnUpstreams {
    /// Record an upstream socket from `local` to `remote` (see
    /// [`OwnUpstreams::connect_registered`]). Forgotten when the returned
    /// guard is dropped, which must be when the socket is closed or later.
    pub fn register(
        self: &Arc<Self>,
        local: SocketAddr,
        remote: SocketAddr,
        origin: Origin,
    ) -> Registration {
        self.connect_registered(remote, origin, || Ok(local))
            .expect("no connect to fail")
    }

    /// Issue `connect` (a non-blocking `connect(2)` to `remote` that
    /// returns the socket's local address) and record the socket, with the
    /// table locked from before the call until the record is in. On
    /// loopback the handshake can complete inside the call, and the accept
    /// loop (on another worker's thread) may accept the connection at once;
    /// its check ([`OwnUpstreams::may_be_own`]) takes the same lock, so it
    /// waits for the record and never misses a loop.
    pub fn connect_registered(
        self: &Arc<Self>,
        remote: SocketAddr,
        origin: Origin,
        connect: impl FnOnce() -> std::io::Result<SocketAddr>,
    ) -> std::io::Result<Registration> {
        let mut map = self.map();
        let local = connect()?;
        let looped = Arc::new(AtomicBool::new(false));
        map.entry(local).or_default().push(Entry {
            remote,
            origin,
            looped: looped.clone(),
        });
        Ok(Registration {
            own: self.clone(),
            local,
            looped,
        })
    }

    /// The table (shared by every worker: a connect made on one worker may
    /// come back through another's accept). A panic elsewhere cannot leave
    /// it half-updated, so a poisoned lock is used as it is.
    fn map(&self) -> MutexGuard<'_, HashMap<SocketAddr, Vec<Entry>>> {
        self.by_local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Might a client from `peer` be one of our own upstream sockets? (A
    /// cheap first test, before asking the accepted socket its address.)
    pub fn may_be_own(&self, peer: SocketAddr) -> bool {
        self.map().contains_key(&peer)
    }

    /// An accepted client from `peer` to our address `local`: if that is
    /// one of our own upstream sockets, mark it looped, count the error on
    /// its forward, warn once per episode, and return true (the caller
    /// resets the client).
    pub fn is_own(&self, peer: SocketAddr, local: SocketAddr, listener: &str) -> bool {
        let map = self.map();
        let Some(e) = map
            .get(&peer)
            .and_then(|v| v.iter().find(|e| reaches(e.remote, local)))
        else {
            return false;
        };
        e.looped.store(true, Relaxed);
        ForwardStats::add(&e.origin.stats.errors, 1);
        if !e.origin.episode.swap(true, Relaxed) {
            tracing::warn!(
                forward = %e.origin.source,
                via = %listener,
                "forward loop: the target is this ambassador itself; \
                 connections on this forward are reset (warned once until one gets through)"
            );
        }
        true
    }
}

/// Does a connection to `remote` arrive at our address `local`? (A
/// connection to 0.0.0.0:P arrives at a loopback address, port P.)
fn reaches(remote: SocketAddr, local: SocketAddr) -> bool {
    remote == local || (remote.ip().is_unspecified() && remote.port() == local.port())
}

/// One registered upstream socket; unregisters on drop.
pub struct Registration {
    own: Arc<OwnUpstreams>,
    local: SocketAddr,
    looped: Arc<AtomicBool>,
}

impl Registration {
    /// Did this connection come back to us (see [`OwnUpstreams::is_own`])?
    pub fn looped(&self) -> bool {
        self.looped.load(Relaxed)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.own.map();
        if let Some(v) = map.get_mut(&self.local) {
            v.retain(|e| !Arc::ptr_eq(&e.looped, &self.looped));
            if v.is_empty() {
                map.remove(&self.local);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loop_decisions() {
        let local = |ip: IpAddr| ip.is_loopback() || ip == "10.1.1.1".parse::<IpAddr>().unwrap();
        let l = sa("127.0.0.1:7000");
        assert!(loops_to_itself(l, &[sa("127.0.0.1:7000")], local).is_some());
        assert!(loops_to_itself(l, &[sa("127.0.0.2:7000")], local).is_none());
        assert!(loops_to_itself(l, &[sa("127.0.0.1:7001")], local).is_none());
        let w = sa("0.0.0.0:7000");
        assert!(loops_to_itself(w, &[sa("127.0.0.2:7000")], local).is_some());
        assert!(loops_to_itself(w, &[sa("10.1.1.1:7000")], local).is_some());
        assert!(loops_to_itself(w, &[sa("10.9.9.9:7000")], local).is_none());
        assert!(loops_to_itself(w, &[sa("[::1]:7000")], local).is_none());
        assert!(loops_to_itself(sa("[::]:7000"), &[sa("[::1]:7000")], local).is_some());
    }

    #[test]
    fn own_sockets_are_matched_by_both_ends() {
        let own = Arc::new(OwnUpstreams::default());
        let origin = Origin {
            source: "A".into(),
            stats: Arc::default(),
            episode: Arc::default(),
        };
        let reg = own.register(sa("127.0.0.1:40000"), sa("127.0.0.1:7000"), origin.clone());
        let other = own.register(sa("127.0.0.1:40000"), sa("127.0.0.1:9999"), origin.clone());
        // A stranger that happens to have the same ephemeral port, to
        // another of our listeners, is not us.
        assert!(own.may_be_own(sa("127.0.0.1:40000")));
        assert!(!own.is_own(sa("127.0.0.1:40000"), sa("127.0.0.1:7001"), "B"));
        assert!(!reg.looped());
        assert!(own.is_own(sa("127.0.0.1:40000"), sa("127.0.0.1:7000"), "B"));
        assert!(reg.looped() && !other.looped());
        assert_eq!(
            origin
                .stats
                .errors
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        drop(reg);
        assert!(!own.is_own(sa("127.0.0.1:40000"), sa("127.0.0.1:7000"), "B"));
        drop(other);
        assert!(!own.may_be_own(sa("127.0.0.1:40000")));
    }

    #[test]
    fn localhost_names() {
        assert!(is_localhost("localhost"));
        assert!(is_localhost("LocalHost."));
        assert!(is_localhost("db.localhost"));
        assert!(!is_localhost("localhost.example"));
    }
}
