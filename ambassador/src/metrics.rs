//! Per-forward counters, kept in memory and logged on SIGUSR1 and at exit.
//!
//! Every engine adds to the same [`ForwardStats`], so the numbers compare
//! across engines. The sockmap engine also reports what the kernel moved
//! (`spliced_*`, read from the BPF program's per-connection counters) apart
//! from what userspace copied (`bytes_*`), which is the proof of splicing:
//! for a spliced connection `bytes_*` stays at the pre-insert bytes only.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Counters of one forward. All monotonic except `conns_active`.
#[derive(Debug, Default)]
pub struct ForwardStats {
    pub conns_total: AtomicU64,
    pub conns_active: AtomicU64,
    /// Bytes copied by userspace, client → upstream.
    pub bytes_to_upstream: AtomicU64,
    /// Bytes copied by userspace, upstream → client.
    pub bytes_to_client: AtomicU64,
    /// Connections that ended in an error (refused, reset, timeout, ...).
    pub errors: AtomicU64,
    /// Bytes the kernel redirected, client → upstream (sockmap engine).
    pub spliced_to_upstream: AtomicU64,
    /// Bytes the kernel redirected, upstream → client (sockmap engine).
    pub spliced_to_client: AtomicU64,
    /// Connections the sockmap engine reset because a direction broke byte
    /// conservation (bytes duplicated, lost or sent after leaving the
    /// kernel): the last line of defence, never expected.
    pub integrity_resets: AtomicU64,
    /// Bytes the sockmap program cut from skbs that repeated bytes it had
    /// already handed on (partly old retransmissions; docs/sockmap.md,
    /// "Overlapping skbs"). Each is a duplicate that never reached the peer.
    pub spliced_trimmed: AtomicU64,
    /// Connections the sockmap engine handed to the userspace path instead
    /// (map full, insert refused, policy).
    pub splice_fallbacks: AtomicU64,
    /// Byte-conservation checks of spliced connections (one per tick of a
    /// connection's driver, both halves).
    pub splice_checks: AtomicU64,
    /// Times a spliced connection went idle and rested: no tick until the
    /// kernel program or an edge wakes it.
    pub spliced_rests: AtomicU64,
    /// Times the kernel program woke a resting spliced connection (bytes
    /// moved again).
    pub spliced_wakes: AtomicU64,
    /// Times a stalled spliced connection (a destination not reading)
    /// waited for the socket events that end the stall instead of ticking.
    pub spliced_stalls: AtomicU64,
}

impl ForwardStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Log the counters as one `stats forward=… key=value …` line.
    pub fn log(&self, source: &str) {
        let g = |c: &AtomicU64| c.load(Relaxed);
        tracing::info!(
            forward = %source,
            conns_total = g(&self.conns_total),
            conns_active = g(&self.conns_active),
            bytes_to_upstream = g(&self.bytes_to_upstream),
            bytes_to_client = g(&self.bytes_to_client),
            errors = g(&self.errors),
            spliced_to_upstream = g(&self.spliced_to_upstream),
            spliced_to_client = g(&self.spliced_to_client),
            integrity_resets = g(&self.integrity_resets),
            spliced_trimmed = g(&self.spliced_trimmed),
            splice_fallbacks = g(&self.splice_fallbacks),
            splice_checks = g(&self.splice_checks),
            spliced_rests = g(&self.spliced_rests),
            spliced_wakes = g(&self.spliced_wakes),
            spliced_stalls = g(&self.spliced_stalls),
            "stats"
        );
    }
}

/// Counters of one backend of a forward (see [`crate::upstream`]).
#[derive(Debug)]
pub struct BackendStats {
    /// Connections made to this backend.
    pub conns_total: AtomicU64,
    pub conns_active: AtomicU64,
    /// Connects that failed (refused, unreachable, timed out).
    pub connect_errors: AtomicU64,
    /// Passive health: false while the backend is ejected.
    pub up: AtomicBool,
}

impl BackendStats {
    pub fn new() -> Self {
        BackendStats {
            conns_total: AtomicU64::new(0),
            conns_active: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            up: AtomicBool::new(true),
        }
    }
}

impl Default for BackendStats {
    fn default() -> Self {
        Self::new()
    }
}

/// Marks a connection active for as long as it lives.
pub struct ActiveGuard(Arc<ForwardStats>);

impl ActiveGuard {
    pub fn new(stats: Arc<ForwardStats>) -> Self {
        stats.conns_total.fetch_add(1, Relaxed);
        stats.conns_active.fetch_add(1, Relaxed);
        ActiveGuard(stats)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.conns_active.fetch_sub(1, Relaxed);
    }
}
