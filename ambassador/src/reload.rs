//! Live reload: SIGHUP, or a change of the `--config` file, applies a new
//! configuration without dropping a connection.
//!
//! A reload is all or nothing, in three steps:
//!
//! 1. **Load.** The whole configuration is built again exactly as at
//!    start-up (the file, the same flags, the same link variables). If that
//!    fails — a parse error, a bad value, two forwards on one address — the
//!    reload is rejected with that one-line reason and nothing changes.
//! 2. **Diff** ([`diff`], pure and unit-tested). Forwards are matched by
//!    listen address: new addresses are *added*, missing ones *removed*, and
//!    the same address with other backends or balancing/health settings is
//!    *changed*.
//! 3. **Bind, then apply.** Every added forward's listener is bound first;
//!    if one cannot be (address in use, or a port below 1024 after the
//!    capabilities were dropped), the reload is rejected and the sockets
//!    already bound for it are closed. Only then: a removed forward stops
//!    accepting (its listener closes) while its connections run to their
//!    end; a changed forward's accept loop gets its new backends for the
//!    next client (live connections keep theirs; a backend kept by the
//!    change keeps its health and counters); an added forward starts.
//!    Timeouts apply to connections accepted from then on. `mode`, `splice`,
//!    `max_conns` and `workers` of running forwards need a restart; a reload that
//!    changes them says so in a warning and applies the rest.
//!
//! A forward whose backends come from etcd (`crate::discovery`) is
//! changed the same way when etcd sends a new set (`Live::discovered`);
//! a reload keeps its watcher (and last set) while its `etcd://` source
//! stays the same.
//!
//! File changes are watched with `notify` on the file's directory (editors
//! and config managers often replace a file by renaming a new one over it)
//! and debounced: a burst of events within 300 ms is one reload.

use crate::config::{Backends, Forward, Settings, Target};
use crate::discovery::etcd::{Starter, Update, Watcher};
use crate::loops::Origin;
use crate::metrics::ForwardStats;
use crate::server::{Current, Fwd, Listeners, Shared, Up, bind};
use crate::upstream::Upstreams;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How to build the configuration again, and the file to watch.
pub struct Reloader {
    /// The config file (`--config`); `None`: SIGHUP has nothing to reload.
    pub path: Option<String>,
    /// Build the whole configuration as at start-up; Err is one line.
    pub load: Box<dyn Fn() -> Result<Settings, String>>,
}

/// A file watcher and its debounced events.
pub struct Changes {
    _watcher: notify::RecommendedWatcher,
    rx: mpsc::UnboundedReceiver<()>,
    /// An event arrived and its quiet period has not ended yet (survives a
    /// cancelled [`changed`], so no change is lost to another signal).
    pending: bool,
}

impl Reloader {
    /// Start watching the config file. A watcher that cannot start is a
    /// warning: SIGHUP still reloads.
    pub fn watch(&self) -> Option<Changes> {
        use notify::Watcher;
        let path = std::path::PathBuf::from(self.path.as_ref()?);
        let name = path.file_name()?.to_owned();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let handler = move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res
                && !matches!(ev.kind, notify::EventKind::Access(_))
                && ev.paths.iter().any(|p| p.file_name() == Some(&name))
            {
                let _ = tx.send(());
            }
        };
        let watcher = notify::recommended_watcher(handler).and_then(|mut w| {
            w.watch(&dir, notify::RecursiveMode::NonRecursive)?;
            Ok(w)
        });
        match watcher {
            Ok(w) => Some(Changes {
                _watcher: w,
                rx,
                pending: false,
            }),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e,
                    "cannot watch the config file: reload with SIGHUP");
                None
            }
        }
    }
}

/// Resolves once the watched file changed and then stayed quiet for
/// 300 ms; never without a watcher.
pub async fn changed(changes: &mut Option<Changes>) {
    let Some(c) = changes else {
        return std::future::pending().await;
    };
    if !c.pending {
        if c.rx.recv().await.is_none() {
            *changes = None;
            return std::future::pending().await;
        }
        c.pending = true;
    }
    while let Ok(Some(())) = tokio::time::timeout(Duration::from_millis(300), c.rx.recv()).await {}
    c.pending = false;
}

/// What a reload changes, by listen address.
#[derive(Debug, Default, PartialEq)]
pub struct Diff {
    pub added: Vec<Forward>,
    pub removed: Vec<SocketAddr>,
    pub changed: Vec<Forward>,
    pub unchanged: usize,
}

/// Compare the running forwards with a new configuration's.
pub fn diff(old: &[Forward], new: &[Forward]) -> Diff {
    let mut d = Diff::default();
    for f in new {
        match old.iter().find(|o| o.listen == f.listen) {
            None => d.added.push(f.clone()),
            Some(o) if o != f => d.changed.push(f.clone()),
            Some(_) => d.unchanged += 1,
        }
    }
    for o in old {
        if !new.iter().any(|f| f.listen == o.listen) {
            d.removed.push(o.listen);
        }
    }
    d
}

/// Global settings a reload cannot apply to what is running.
pub fn restart_only(old: &Settings, new: &Settings) -> Vec<&'static str> {
    let mut v = Vec::new();
    if old.mode != new.mode {
        v.push("mode");
    }
    if old.splice != new.splice {
        v.push("splice");
    }
    if old.max_conns != new.max_conns {
        v.push("max_conns");
    }
    if old.workers != new.workers {
        v.push("workers");
    }
    v
}

struct Running {
    forward: Forward,
    fwd: Arc<Fwd>,
    stats: Arc<ForwardStats>,
    stop: watch::Sender<bool>,
    /// A forward from etcd: its watcher and the last set it sent.
    etcd: Option<Etcd>,
}

/// An etcd forward's source of backends (dropping it stops the watcher).
pub(crate) struct Etcd {
    watcher: Watcher,
    backends: Vec<Target>,
}

impl Etcd {
    pub fn new((watcher, backends): (Watcher, Vec<Target>)) -> Etcd {
        Etcd { watcher, backends }
    }
}

/// The running forwards of the server.
pub(crate) struct Live {
    settings: Arc<Settings>,
    shared: Rc<Shared>,
    running: BTreeMap<SocketAddr, Running>,
    /// Every forward's counters, removed ones too (their connections may
    /// still be draining; their totals are logged at exit).
    all: Vec<(String, Arc<ForwardStats>)>,
    /// Starts the etcd watchers of forwards a reload adds or changes.
    etcd: Starter,
}

impl Live {
    pub fn new(settings: Arc<Settings>, shared: Rc<Shared>, etcd: Starter) -> Live {
        Live {
            settings,
            shared,
            running: BTreeMap::new(),
            all: Vec::new(),
            etcd,
        }
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings.clone()
    }

    pub fn all_stats(&self) -> Vec<(String, Arc<ForwardStats>)> {
        self.all.clone()
    }

    /// The accept loop's state for `f` with `backends` (its own, or the
    /// ones etcd gave it); `old`: the one a change replaces.
    fn current(
        &self,
        f: &Forward,
        backends: Vec<Target>,
        stats: &Arc<ForwardStats>,
        old: Option<&Upstreams>,
    ) -> Current {
        let upstreams =
            Upstreams::replacing(old, f.source.as_str().into(), backends, f.pool.clone());
        crate::exporter::global().add_forward(crate::exporter::ForwardEntry {
            listen: f.listen.to_string(),
            stats: stats.clone(),
            backends: upstreams.backend_stats(),
        });
        Current {
            upstreams,
            settings: self.settings.clone(),
        }
    }

    /// Start serving `forward` on its bound `listeners` (on every worker);
    /// `etcd`: its watcher and first set, for a forward from etcd. The
    /// result resolves once every worker accepts.
    pub fn start(&mut self, forward: Forward, listeners: Listeners, etcd: Option<Etcd>) -> Up {
        let stats = Arc::new(ForwardStats::default());
        let backends = match &etcd {
            Some(e) => e.backends.clone(),
            None => forward.target.0.clone(),
        };
        tracing::info!(
            forward = %forward.source,
            listen = %forward.listen,
            target = %forward.target_display(),
            backends = %Backends(backends.clone()),
            "listening"
        );
        let fwd = Arc::new(Fwd {
            origin: Origin {
                source: forward.source.as_str().into(),
                stats: stats.clone(),
                episode: Arc::default(),
            },
            current: Mutex::new(self.current(&forward, backends, &stats, None)),
        });
        let (stop, stop_rx) = watch::channel(false);
        let up = self.shared.accept(listeners, &fwd, &stop_rx);
        self.all.push((forward.source.clone(), stats.clone()));
        self.running.insert(
            forward.listen,
            Running {
                forward,
                fwd,
                stats,
                stop,
                etcd,
            },
        );
        up
    }

    /// A watcher for a forward a reload added or moved to another etcd
    /// source: it does not block the reload (its first read arrives as an
    /// update; until then the forward has no backend).
    fn watch(&mut self, f: &Forward) -> Option<Etcd> {
        let d = f.discovery.as_ref()?;
        match self.etcd.start(d, f.listen, false) {
            Ok(started) => Some(Etcd::new(started)),
            Err(e) => {
                tracing::warn!(forward = %f.source, error = %e, "cannot watch etcd");
                None
            }
        }
    }

    /// etcd sent a new backend set for a forward: new clients use it (kept
    /// backends keep their health and counters; live connections keep
    /// their backend).
    pub fn discovered(&mut self, u: Update) {
        let Some(r) = self.running.get_mut(&u.listen) else {
            return;
        };
        let Some(e) = r.etcd.as_mut().filter(|e| e.watcher.id == u.watcher) else {
            return; // a replaced watcher's last words
        };
        if e.backends == u.backends {
            return;
        }
        e.backends = u.backends.clone();
        let (forward, stats) = (r.forward.clone(), r.stats.clone());
        let old = r.fwd.current().upstreams.clone();
        let current = self.current(&forward, u.backends.clone(), &stats, Some(&old));
        let r = self.running.get_mut(&u.listen).expect("present");
        *r.fwd.current() = current;
        let n = u.backends.len();
        let backends = Backends(u.backends);
        let kind = forward.discovery.as_ref().map_or("etcd", |d| d.kind_name());
        match n {
            0 => tracing::warn!(forward = %forward.source, listen = %forward.listen,
                source = %forward.target_display(),
                "{kind} backends changed: none registered, new clients are closed"),
            _ => tracing::info!(forward = %forward.source, listen = %forward.listen,
                backends = %backends, count = n,
                "{kind} backends changed: new connections use the new set"),
        }
    }

    /// Stop every accept loop (SIGTERM/SIGINT).
    pub fn stop_all(&self) {
        for r in self.running.values() {
            let _ = r.stop.send(true);
        }
    }

    /// Reload from `reloader` (`why`: what triggered it, for the log).
    pub fn reload(&mut self, reloader: Option<&Reloader>, why: &str) {
        let Some(r) = reloader.filter(|r| r.path.is_some()) else {
            tracing::info!(trigger = %why, "reload requested: no config file, nothing to reload");
            return;
        };
        let file = r.path.as_deref().unwrap_or("");
        tracing::info!(trigger = %why, file, "reloading");
        let new = match (r.load)() {
            Ok(s) => s,
            Err(reason) => {
                tracing::warn!(file, %reason, "reload rejected: the running configuration stays");
                return;
            }
        };
        let old: Vec<Forward> = self.running.values().map(|r| r.forward.clone()).collect();
        let d = diff(&old, &new.forwards);
        // Bind every new listener before changing anything.
        let mut bound = Vec::new();
        for f in &d.added {
            let l = bind(f.listen).and_then(|l| self.shared.listeners(l));
            match l {
                Ok(l) => bound.push(l),
                Err(e) => {
                    tracing::warn!(file, forward = %f.source, listen = %f.listen, error = %e,
                        "reload rejected: cannot listen; the running configuration stays");
                    return;
                }
            }
        }
        for setting in restart_only(&self.settings, &new) {
            tracing::warn!(
                file,
                setting,
                "reload: this setting changes only after a restart"
            );
        }
        let mut settings = new;
        settings.mode = self.settings.mode;
        settings.splice = self.settings.splice;
        settings.max_conns = self.settings.max_conns;
        settings.workers = self.settings.workers;
        self.settings = Arc::new(settings);

        for addr in &d.removed {
            if let Some(r) = self.running.remove(addr) {
                let _ = r.stop.send(true);
                crate::exporter::global().remove_forward(&addr.to_string());
                tracing::info!(forward = %r.forward.source, listen = %addr,
                    active = r.stats.conns_active.load(Relaxed),
                    "forward removed: stopped accepting; its connections drain");
            }
        }
        for f in &d.changed {
            let Some((stats, old, etcd)) = self.running.get_mut(&f.listen).map(|r| {
                let old = r.fwd.current().upstreams.clone();
                (r.stats.clone(), old, r.etcd.take())
            }) else {
                continue;
            };
            // The same etcd source keeps its watcher and set; another one
            // starts afresh.
            let etcd = match (etcd, &f.discovery) {
                (Some(e), Some(d)) if e.watcher.discovery == *d => Some(e),
                (_, Some(_)) => self.watch(f),
                (_, None) => None,
            };
            let backends = match &etcd {
                Some(e) => e.backends.clone(),
                None => f.target.0.clone(),
            };
            let current = self.current(f, backends, &stats, Some(&old));
            let r = self.running.get_mut(&f.listen).expect("present");
            *r.fwd.current() = current;
            r.etcd = etcd;
            tracing::info!(forward = %f.source, listen = %f.listen, target = %f.target_display(),
                "forward changed: new connections use the new backends");
            r.forward = f.clone();
        }
        // Unchanged forwards take the new timeouts too.
        for r in self.running.values() {
            r.fwd.current().settings = self.settings.clone();
        }
        for (f, l) in d.added.iter().zip(bound) {
            let etcd = self.watch(f);
            // Accepting on every worker soon: nothing waits for it here.
            drop(self.start(f.clone(), l, etcd));
        }
        tracing::info!(
            file,
            added = d.added.len(),
            removed = d.removed.len(),
            changed = d.changed.len(),
            unchanged = d.unchanged,
            "reloaded"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Proto, parse};

    fn fwd(spec: &str) -> Forward {
        let (listen, target) = parse::forward(spec).unwrap();
        Forward {
            source: format!("--forward {spec}"),
            listen,
            target,
            proto: Proto::Tcp,
            pool: Default::default(),
            discovery: None,
        }
    }

    #[test]
    fn diff_by_listen_address() {
        let old = [fwd("7000=a:1"), fwd("7001=b:1"), fwd("7002=c:1")];
        let new = [fwd("7000=a:1"), fwd("7001=b:1,b:2"), fwd("7003=d:1")];
        let d = diff(&old, &new);
        assert_eq!(d.unchanged, 1);
        assert_eq!(d.changed, [fwd("7001=b:1,b:2")]);
        assert_eq!(d.added, [fwd("7003=d:1")]);
        assert_eq!(d.removed, [fwd("7002=c:1").listen]);
        assert_eq!(diff(&old, &old).unchanged, 3);
        assert_eq!(diff(&old, &old).changed.len(), 0);
    }

    #[test]
    fn a_new_balance_is_a_change() {
        let old = [fwd("7000=a:1,b:1")];
        let mut f = fwd("7000=a:1,b:1");
        f.pool.balance = crate::balance::Balance::LeastConn;
        let d = diff(&old, std::slice::from_ref(&f));
        assert_eq!(d.changed, [f]);
    }
}
