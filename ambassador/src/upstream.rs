//! Connecting a client's upstream: pick a backend, connect, retry the next.
//!
//! This is the I/O half of [`crate::balance`]: each forward has one
//! [`Upstreams`], which owns the forward's backends, their [`Pool`] (health
//! and balancing decisions) and their counters. For every accepted client
//! the server calls [`Upstreams::connect`], which
//!
//! 1. asks the pool for a plan (the healthy backends, in balancing order);
//! 2. connects to each in turn within `--connect-timeout` — a hostname is
//!    resolved again for every connect, so a moved name needs no restart —
//!    and stops at the first that answers. Nothing has been sent yet when a
//!    connect fails, so trying the next backend is always safe;
//! 3. reports each result to the pool, which may eject a backend (logged as
//!    one `backend down` warning) or restore it (`backend up`).
//!
//! The engines never see any of this: they get two connected sockets. The
//! returned [`Lease`] keeps the backend's live-connection count (used by
//! `least-conn` and the metrics) until the connection ends.

use crate::balance::{Pool, PoolConfig, Transition};
use crate::config::{Host, Target};
use crate::metrics::BackendStats;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// The backends of one forward and their shared state.
pub struct Upstreams {
    forward: Arc<str>,
    backends: Vec<Target>,
    /// Shared by every worker: one balancing order and one health view.
    pool: Mutex<Pool>,
    stats: Vec<Arc<BackendStats>>,
    /// Replaced by a reload: its checkers stop.
    retired: AtomicBool,
    /// See [`Upstreams::family`]: worked out once, read on every accept.
    family: Option<socket2::Domain>,
}

/// How one connect attempt failed.
#[derive(Debug)]
pub enum AttemptError {
    /// Refused, unreachable, …: the next backend may be tried.
    Failed(io::Error),
    /// Stop trying (the attempt reached this ambassador itself: a loop,
    /// already reported).
    Stop(io::Error),
}

/// Why a client got no upstream. Its [`Failure::log`] is the one warning.
#[derive(Debug)]
pub enum Failure {
    /// The connect came back to this ambassador (a loop, already logged).
    Looped,
    /// Every backend is ejected: nothing was tried.
    NoBackend,
    /// The last backend tried refused or was unreachable (`tried`
    /// backends were tried, each failed).
    Refused {
        target: String,
        error: io::Error,
        tried: usize,
    },
    /// The last backend tried did not answer within the connect timeout.
    TimedOut {
        target: String,
        timeout: Duration,
        tried: usize,
    },
}

impl Failure {
    /// The one warning for a client that got no upstream (the message
    /// names both addresses).
    pub fn log(&self, id: u64, forward: &str, client: SocketAddr, ups: &Upstreams) {
        match self {
            Failure::Looped => {}
            Failure::NoBackend => tracing::warn!(
                id,
                forward = %forward,
                client = %client,
                backends = %ups.backends_display(),
                "no healthy backend: closing the client"
            ),
            Failure::Refused {
                target,
                error,
                tried,
            } => tracing::warn!(
                id, forward = %forward, client = %client, upstream = %target, error = %error,
                tried, "upstream connect failed"
            ),
            Failure::TimedOut {
                target,
                timeout,
                tried,
            } => tracing::warn!(
                id, forward = %forward, client = %client, upstream = %target, timeout = ?timeout,
                tried, "upstream connect timed out"
            ),
        }
    }
}

/// One live connection's hold on its backend; released on drop.
pub struct Lease {
    ups: Arc<Upstreams>,
    index: usize,
}

impl Lease {
    pub fn backend(&self) -> &Target {
        &self.ups.backends[self.index]
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.ups.pool().closed(self.index);
        self.ups.stats[self.index]
            .conns_active
            .fetch_sub(1, Relaxed);
    }
}

impl Upstreams {
    /// The backends of a forward. With `cfg.interval` set this spawns one
    /// active checker per backend on the current (local) runtime; the
    /// checkers end once the `Upstreams` is gone.
    pub fn new(forward: Arc<str>, backends: Vec<Target>, cfg: PoolConfig) -> Arc<Upstreams> {
        Upstreams::replacing(None, forward, backends, cfg)
    }

    /// Like [`Upstreams::new`], for a reload that changed the forward: a
    /// backend that `old` also has keeps its counters and its health;
    /// `old` is retired (its checkers stop; its live connections go on).
    pub fn replacing(
        old: Option<&Upstreams>,
        forward: Arc<str>,
        backends: Vec<Target>,
        cfg: PoolConfig,
    ) -> Arc<Upstreams> {
        let interval = cfg.interval;
        let mut pool = Pool::new(backends.len(), cfg);
        let mut stats = Vec::new();
        for (i, t) in backends.iter().enumerate() {
            match old.and_then(|o| o.backends.iter().position(|b| b == t).map(|j| (o, j))) {
                Some((o, j)) => {
                    pool.adopt(i, &o.pool(), j);
                    stats.push(o.stats[j].clone());
                }
                None => stats.push(Arc::new(BackendStats::new())),
            }
        }
        if let Some(o) = old {
            o.retired.store(true, Relaxed);
        }
        let ups = Arc::new(Upstreams {
            forward,
            pool: Mutex::new(pool),
            family: family_of(&backends),
            backends,
            stats,
            retired: AtomicBool::new(false),
        });
        if let Some(every) = interval {
            for i in 0..ups.backends.len() {
                tokio::task::spawn_local(check_loop(Arc::downgrade(&ups), i, every));
            }
        }
        ups
    }

    /// The address family every backend's socket will have, when all of
    /// them are IP addresses of one family (the accept loop then makes the
    /// next upstream socket of that family before it accepts, and one of
    /// each otherwise: see `server/fds.rs`); `None` with a hostname
    /// (resolved per connection), mixed families or no backend.
    pub fn family(&self) -> Option<socket2::Domain> {
        self.family
    }

    /// Has this forward no backend (e.g. none registered in etcd yet)?
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// The forward's source (variable or flag), for logs.
    pub fn source(&self) -> Arc<str> {
        self.forward.clone()
    }

    /// Each backend with its counters, for the metrics.
    pub fn backend_stats(&self) -> Vec<(String, Arc<BackendStats>)> {
        self.backends
            .iter()
            .map(|t| t.to_string())
            .zip(self.stats.iter().cloned())
            .collect()
    }

    fn backends_display(&self) -> String {
        let v: Vec<String> = self.backends.iter().map(|t| t.to_string()).collect();
        v.join(",")
    }

    /// Connect to a backend for one client: the healthy backends in
    /// balancing order, each at most once, each within `timeout`, with a
    /// plain connect.
    pub async fn connect(
        self: &Arc<Self>,
        id: u64,
        client: SocketAddr,
        timeout: Duration,
    ) -> Result<(TcpStream, SocketAddr, Lease), Failure> {
        let attempt = |t: Target| async move { connect(&t).await.map_err(AttemptError::Failed) };
        let ((s, a), lease) = self.connect_with(id, client, timeout, attempt).await?;
        Ok((s, a, lease))
    }

    /// [`Upstreams::connect`] with the server's own connect (`attempt`: it
    /// registers the socket for the loop check and takes the descriptor
    /// reservation). An [`AttemptError::Stop`] ends the tries at once.
    pub async fn connect_with<T, F, Fut>(
        self: &Arc<Self>,
        id: u64,
        client: SocketAddr,
        timeout: Duration,
        mut attempt: F,
    ) -> Result<(T, Lease), Failure>
    where
        F: FnMut(Target) -> Fut,
        Fut: std::future::Future<Output = Result<T, AttemptError>>,
    {
        let plan = {
            let mut pool = self.pool();
            for i in pool.tick(Instant::now()) {
                self.note(i, Transition::Trial);
            }
            pool.plan()
        };
        let mut last = Failure::NoBackend;
        for (k, &i) in plan.iter().enumerate() {
            let target = &self.backends[i];
            let failure = match tokio::time::timeout(timeout, attempt(target.clone())).await {
                Ok(Ok(connected)) => {
                    let change = {
                        let mut pool = self.pool();
                        pool.opened(i);
                        pool.connected(i)
                    };
                    if let Some(t) = change {
                        self.note(i, t);
                    }
                    let s = &self.stats[i];
                    s.conns_total.fetch_add(1, Relaxed);
                    s.conns_active.fetch_add(1, Relaxed);
                    let lease = Lease {
                        ups: self.clone(),
                        index: i,
                    };
                    return Ok((connected, lease));
                }
                Ok(Err(AttemptError::Stop(_))) => return Err(Failure::Looped),
                Ok(Err(AttemptError::Failed(error))) => Failure::Refused {
                    target: target.to_string(),
                    error,
                    tried: k + 1,
                },
                Err(_) => Failure::TimedOut {
                    target: target.to_string(),
                    timeout,
                    tried: k + 1,
                },
            };
            self.stats[i].connect_errors.fetch_add(1, Relaxed);
            let change = self.pool().failed(i, Instant::now());
            if let Some(t) = change {
                self.note(i, t);
            }
            if k + 1 < plan.len() {
                let why = match &failure {
                    Failure::Refused { error, .. } => error.to_string(),
                    _ => format!("no answer within {timeout:?}"),
                };
                tracing::info!(id, forward = %self.forward, client = %client, upstream = %target,
                    error = %why, "backend connect failed: trying the next backend");
            }
            last = failure;
        }
        Err(last)
    }

    /// The pool, locked (never across an await). A panic elsewhere cannot
    /// leave it half-updated in a way that matters, so poison is ignored.
    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Log a health transition of backend `i` and update its gauge.
    fn note(&self, i: usize, t: Transition) {
        self.note_why(i, t, "consecutive connect failures")
    }

    fn note_why(&self, i: usize, t: Transition, why: &str) {
        let backend = &self.backends[i];
        match t {
            Transition::Ejected { backoff } => {
                self.stats[i].up.store(false, Relaxed);
                tracing::warn!(forward = %self.forward, backend = %backend, backoff = ?backoff,
                    reason = why, "backend down: ejected");
            }
            Transition::Trial => {
                self.stats[i].up.store(true, Relaxed);
                tracing::info!(forward = %self.forward, backend = %backend,
                    "backend trial: back-off over, taking connections again");
            }
            Transition::Restored => {
                self.stats[i].up.store(true, Relaxed);
                tracing::info!(forward = %self.forward, backend = %backend, "backend up");
            }
        }
    }
}

/// Active TCP health check of backend `i`: a connect every `every`
/// (within the smaller of `every` and 5 s), closed at once; the result goes
/// to the pool's rise/fall counters. Ends when the forward's `Upstreams`
/// is dropped (removed or changed by a reload, and its connections done).
async fn check_loop(ups: std::sync::Weak<Upstreams>, i: usize, every: Duration) {
    let limit = every.min(Duration::from_secs(5));
    loop {
        tokio::time::sleep(every).await;
        let Some(u) = ups.upgrade().filter(|u| !u.retired.load(Relaxed)) else {
            return;
        };
        let target = u.backends[i].clone();
        drop(u);
        let ok = matches!(
            tokio::time::timeout(limit, connect(&target)).await,
            Ok(Ok(_))
        );
        let Some(u) = ups.upgrade().filter(|u| !u.retired.load(Relaxed)) else {
            return;
        };
        let change = u.pool().checked(i, ok, Instant::now());
        if let Some(t) = change {
            u.note_why(i, t, "failed health checks");
        }
    }
}

/// Connect to one target, resolving a hostname now and trying each of its
/// addresses in turn. Returns the address that answered.
async fn connect(target: &Target) -> io::Result<(TcpStream, SocketAddr)> {
    let addrs: Vec<SocketAddr> = match &target.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), target.port))
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("resolving {name}: {e}")))?
            .collect(),
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "name resolved to no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok((s, addr)),
            Err(e) => last = io::Error::new(e.kind(), format!("{addr}: {e}")),
        }
    }
    Err(last)
}

/// See [`Upstreams::family`].
fn family_of(backends: &[Target]) -> Option<socket2::Domain> {
    let v6 = |t: &Target| match t.host {
        Host::Ip(ip) => Some(ip.is_ipv6()),
        Host::Name(_) => None,
    };
    let first = v6(backends.first()?)?;
    backends
        .iter()
        .all(|t| v6(t) == Some(first))
        .then_some(if first {
            socket2::Domain::IPV6
        } else {
            socket2::Domain::IPV4
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Host;
    use socket2::Domain;

    fn family(hosts: &[&str]) -> Option<Domain> {
        let backends: Vec<Target> = hosts
            .iter()
            .map(|h| Target {
                host: h
                    .parse()
                    .map_or_else(|_| Host::Name(h.to_string()), Host::Ip),
                port: 80,
            })
            .collect();
        family_of(&backends)
    }

    #[test]
    fn family_is_known_only_when_every_backend_is_an_ip_of_one_family() {
        assert_eq!(family(&["10.0.0.1", "10.0.0.2"]), Some(Domain::IPV4));
        assert_eq!(family(&["::1"]), Some(Domain::IPV6));
        assert_eq!(family(&["10.0.0.1", "::1"]), None);
        assert_eq!(family(&["10.0.0.1", "db"]), None);
        assert_eq!(family(&[]), None);
    }
}
