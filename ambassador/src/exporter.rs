//! What `/metrics`, `/healthz` and `/readyz` report, kept apart from HTTP.
//!
//! The counters themselves live where the work happens: [`ForwardStats`]
//! per forward (filled by every engine; the sockmap engine adds what the
//! kernel spliced) and [`BackendStats`] per backend (filled by
//! [`crate::upstream`]). This module only keeps a list of them — the
//! [`Registry`] — and turns one snapshot into the Prometheus text format
//! (0.0.4) with the `prometheus` crate's encoder. A fresh
//! `prometheus::Registry` is built for every scrape and filled from the
//! atomics, so nothing is counted twice and a forward removed by a reload
//! simply stops appearing.
//!
//! Labels: `listen` (the forward's listen address, unique per forward) and,
//! per backend, `backend` (`HOST:PORT` as configured). The process-wide
//! registry is [`global`]; the server adds forwards to it, marks it ready
//! once every listener is bound and the engine chosen, and marks it
//! draining on SIGTERM. Before a scrape the HTTP thread asks the server
//! loop, through [`Registry::refresh`], to fold the kernel's counters in
//! (sockmap engine), waiting at most a second for the answer.

use crate::metrics::{BackendStats, ForwardStats};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, TextEncoder};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

/// One forward as the metrics see it.
#[derive(Clone)]
pub struct ForwardEntry {
    /// The listen address, as a label.
    pub listen: String,
    pub stats: Arc<ForwardStats>,
    /// `HOST:PORT` and counters of each backend.
    pub backends: Vec<(String, Arc<BackendStats>)>,
}

/// A request to bring the kernel's counters into the stats; the server
/// answers on the enclosed channel once done.
pub type RefreshRequest = mpsc::SyncSender<()>;

/// The live forwards, the engine and the readiness of the process.
#[derive(Default)]
pub struct Registry {
    forwards: Mutex<Vec<ForwardEntry>>,
    engine: Mutex<Option<&'static str>>,
    ready: AtomicBool,
    draining: AtomicBool,
    refresh: Mutex<Option<tokio::sync::mpsc::UnboundedSender<RefreshRequest>>>,
}

/// The process-wide registry.
pub fn global() -> &'static Registry {
    static G: OnceLock<Registry> = OnceLock::new();
    G.get_or_init(Registry::default)
}

impl Registry {
    /// Add a forward, or replace the one with the same listen address.
    pub fn add_forward(&self, entry: ForwardEntry) {
        let mut f = self.forwards.lock().unwrap();
        f.retain(|e| e.listen != entry.listen);
        f.push(entry);
    }

    /// Forget a forward (removed by a reload).
    pub fn remove_forward(&self, listen: &str) {
        self.forwards.lock().unwrap().retain(|e| e.listen != listen);
    }

    /// Every listener is bound and `engine` chosen.
    pub fn set_ready(&self, engine: &'static str) {
        *self.engine.lock().unwrap() = Some(engine);
        self.ready.store(true, Relaxed);
    }

    /// SIGTERM/SIGINT: `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Relaxed);
    }

    /// `/readyz`: ready and not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Relaxed) && !self.draining.load(Relaxed)
    }

    /// The server side of [`Registry::refresh`]: requests arrive here.
    pub fn refresh_requests(&self) -> tokio::sync::mpsc::UnboundedReceiver<RefreshRequest> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.refresh.lock().unwrap() = Some(tx);
        rx
    }

    /// Ask the server loop to fold the kernel's counters in; wait up to
    /// `wait`. Without a server loop (or past the wait) the stats are used
    /// as they are.
    pub fn refresh(&self, wait: Duration) {
        let tx = self.refresh.lock().unwrap().clone();
        if let Some(tx) = tx {
            let (done_tx, done_rx) = mpsc::sync_channel(1);
            if tx.send(done_tx).is_ok() {
                let _ = done_rx.recv_timeout(wait);
            }
        }
    }

    /// The Prometheus text for the current values.
    pub fn render(&self) -> String {
        let forwards = self.forwards.lock().unwrap().clone();
        let engine = *self.engine.lock().unwrap();
        render(&forwards, engine)
    }
}

/// Called by the server once every listener is bound: mark the process
/// ready with its engine, and answer refresh requests from the HTTP thread
/// on the server's (single-threaded) runtime. Spawns a local task.
pub fn on_ready(engine: std::rc::Rc<crate::engine::Engine>) {
    let registry = global();
    registry.set_ready(engine.name());
    let mut requests = registry.refresh_requests();
    tokio::task::spawn_local(async move {
        while let Some(done) = requests.recv().await {
            engine.refresh_stats();
            let _ = done.send(());
        }
    });
}

/// Counters and gauges of one scrape, registered in a throw-away registry.
struct Families {
    reg: prometheus::Registry,
}

impl Families {
    fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.reg
            .register(Box::new(c.clone()))
            .expect("unique metric");
        c
    }

    fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.reg
            .register(Box::new(g.clone()))
            .expect("unique metric");
        g
    }
}

/// Which counter of [`ForwardStats`] a metric reports.
type Field = fn(&ForwardStats) -> &AtomicU64;

/// Render `forwards` and the engine as Prometheus text format 0.0.4.
pub fn render(forwards: &[ForwardEntry], engine: Option<&str>) -> String {
    let f = Families {
        reg: prometheus::Registry::new(),
    };
    let fw = ["listen"];
    let per_forward: Vec<(IntCounterVec, Field)> = vec![
        (
            f.counter(
                "ambassador_connections_total",
                "Client connections accepted.",
                &fw,
            ),
            |s| &s.conns_total,
        ),
        (
            f.counter(
                "ambassador_bytes_to_upstream_total",
                "Bytes copied by userspace from clients to backends.",
                &fw,
            ),
            |s| &s.bytes_to_upstream,
        ),
        (
            f.counter(
                "ambassador_bytes_to_client_total",
                "Bytes copied by userspace from backends to clients.",
                &fw,
            ),
            |s| &s.bytes_to_client,
        ),
        (
            f.counter(
                "ambassador_spliced_to_upstream_total",
                "Bytes the kernel redirected from clients to backends (sockmap engine).",
                &fw,
            ),
            |s| &s.spliced_to_upstream,
        ),
        (
            f.counter(
                "ambassador_spliced_to_client_total",
                "Bytes the kernel redirected from backends to clients (sockmap engine).",
                &fw,
            ),
            |s| &s.spliced_to_client,
        ),
        (
            f.counter(
                "ambassador_splice_fallbacks_total",
                "Connections the sockmap engine copied in userspace instead of splicing.",
                &fw,
            ),
            |s| &s.splice_fallbacks,
        ),
        (
            f.counter(
                "ambassador_integrity_resets_total",
                "Connections reset because in-order delivery could not be proven (sockmap engine).",
                &fw,
            ),
            |s| &s.integrity_resets,
        ),
        (
            f.counter(
                "ambassador_splice_trimmed_bytes_total",
                "Repeated bytes the sockmap program cut from partly old retransmissions.",
                &fw,
            ),
            |s| &s.spliced_trimmed,
        ),
        (
            f.counter(
                "ambassador_splice_checks_total",
                "Byte-conservation checks of spliced connections (sockmap engine).",
                &fw,
            ),
            |s| &s.splice_checks,
        ),
        (
            f.counter(
                "ambassador_spliced_rests_total",
                "Times an idle spliced connection rested until the kernel woke it (sockmap engine).",
                &fw,
            ),
            |s| &s.spliced_rests,
        ),
        (
            f.counter(
                "ambassador_spliced_wakes_total",
                "Times the kernel program woke a resting spliced connection (sockmap engine).",
                &fw,
            ),
            |s| &s.spliced_wakes,
        ),
        (
            f.counter(
                "ambassador_spliced_stalls_total",
                "Times a stalled spliced connection waited for socket events instead of ticking (sockmap engine).",
                &fw,
            ),
            |s| &s.spliced_stalls,
        ),
        (
            f.counter(
                "ambassador_errors_total",
                "Connections that ended in an error (no backend, reset, timeout).",
                &fw,
            ),
            |s| &s.errors,
        ),
    ];
    let active = f.gauge(
        "ambassador_connections_active",
        "Client connections open now.",
        &fw,
    );
    let be = ["listen", "backend"];
    let b_total = f.counter(
        "ambassador_backend_connections_total",
        "Connections made to a backend.",
        &be,
    );
    let b_active = f.gauge(
        "ambassador_backend_connections_active",
        "Connections open to a backend now.",
        &be,
    );
    let b_errors = f.counter(
        "ambassador_connect_errors_total",
        "Connects to a backend that failed (refused, unreachable, timed out).",
        &be,
    );
    let b_up = f.gauge(
        "ambassador_backend_up",
        "Passive health of a backend: 1 takes connections, 0 ejected.",
        &be,
    );
    let info = f.gauge(
        "ambassador_engine_info",
        "The engine moving the bytes (label engine), 1.",
        &["engine"],
    );
    for e in forwards {
        let l = [e.listen.as_str()];
        for (c, field) in &per_forward {
            c.with_label_values(&l)
                .inc_by(field(&e.stats).load(Relaxed));
        }
        active
            .with_label_values(&l)
            .set(e.stats.conns_active.load(Relaxed) as i64);
        for (name, s) in &e.backends {
            let l = [e.listen.as_str(), name.as_str()];
            b_total
                .with_label_values(&l)
                .inc_by(s.conns_total.load(Relaxed));
            b_active
                .with_label_values(&l)
                .set(s.conns_active.load(Relaxed) as i64);
            b_errors
                .with_label_values(&l)
                .inc_by(s.connect_errors.load(Relaxed));
            b_up.with_label_values(&l).set(s.up.load(Relaxed) as i64);
        }
    }
    if let Some(engine) = engine {
        info.with_label_values(&[engine]).set(1);
    }
    TextEncoder::new()
        .encode_to_string(&f.reg.gather())
        .expect("text encoding never fails")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_values_and_labels() {
        let stats = Arc::new(ForwardStats::default());
        stats.conns_total.store(5, Relaxed);
        stats.bytes_to_upstream.store(5000, Relaxed);
        stats.integrity_resets.store(2, Relaxed);
        let b = Arc::new(BackendStats::new());
        b.connect_errors.store(3, Relaxed);
        b.up.store(false, Relaxed);
        let text = render(
            &[ForwardEntry {
                listen: "127.0.0.1:7000".into(),
                stats,
                backends: vec![("db:6379".into(), b)],
            }],
            Some("epoll"),
        );
        for line in [
            "ambassador_connections_total{listen=\"127.0.0.1:7000\"} 5",
            "ambassador_bytes_to_upstream_total{listen=\"127.0.0.1:7000\"} 5000",
            "ambassador_integrity_resets_total{listen=\"127.0.0.1:7000\"} 2",
            "ambassador_connections_active{listen=\"127.0.0.1:7000\"} 0",
            "ambassador_connect_errors_total{backend=\"db:6379\",listen=\"127.0.0.1:7000\"} 3",
            "ambassador_backend_up{backend=\"db:6379\",listen=\"127.0.0.1:7000\"} 0",
            "ambassador_engine_info{engine=\"epoll\"} 1",
            "# TYPE ambassador_connections_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn an_empty_registry_still_renders() {
        let text = render(&[], None);
        assert!(!text.contains("ambassador_engine_info{"), "{text}");
    }
}
