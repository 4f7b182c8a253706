//! The rows of the table: what sits between client and server. One module per
//! peer; each turns a list of forwards into running, pinned processes.
//!
//! A row forwards every backend the workloads use (sockperf, iperf3, HTTP,
//! idle) at once, so that one process per row serves the whole round and the
//! rows can alternate figure by figure.

mod ambassador;
mod haproxy;
pub mod nginx;
mod socat;

use crate::sys::{self, Proc};
use anyhow::Result;
use std::path::Path;

/// A row of the report.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// No proxy: the client talks to the server. The baseline.
    Direct,
    Socat,
    /// HAProxy with `nbthread N`.
    Haproxy(u32),
    /// nginx stream with `worker_processes N`.
    Nginx(u32),
    /// `ambassador --mode <engine>`; "auto" included.
    Ambassador(String),
}

impl Kind {
    pub fn name(&self) -> String {
        match self {
            Kind::Direct => "direct".into(),
            Kind::Socat => "socat".into(),
            Kind::Haproxy(1) => "haproxy".into(),
            Kind::Haproxy(n) => format!("haproxy nbthread {n}"),
            Kind::Nginx(1) => "nginx".into(),
            Kind::Nginx(n) => format!("nginx worker_processes {n}"),
            Kind::Ambassador(e) => format!("ambassador {e}"),
        }
    }

    /// The most idle connections the idle figure holds through this row:
    /// HAProxy's maxconn (less a margin), and for socat 2,000, because socat
    /// forks a process per connection and 10,000 forks take over a minute on
    /// this shared 2-core VM; its cost per connection is linear (one process
    /// each), so 2,000 gives the same per-connection figure.
    pub fn max_conns(&self) -> Option<usize> {
        match self {
            Kind::Haproxy(_) => Some(haproxy::MAXCONN - 100),
            Kind::Socat => Some(2000),
            _ => None,
        }
    }

    pub fn all() -> Vec<Kind> {
        let mut v = vec![Kind::Direct, Kind::Socat, Kind::Haproxy(1), Kind::Nginx(1)];
        // The engines as users run them (defaults), then the in-kernel path
        // forced on: `--splice adaptive` (the default) may copy a connection
        // in userspace, and this row shows what splicing itself does.
        for e in [
            "sockmap",
            "uring",
            "epoll",
            "auto",
            "sockmap --splice always",
        ] {
            v.push(Kind::Ambassador(e.into()));
        }
        v
    }

    /// The rows of the two-CPU pass: HAProxy and nginx with two threads /
    /// workers, and each engine that runs workers with one and with two (the
    /// 1 → 2 worker ratio comes from these pairs). sockmap is asked for two and
    /// runs one (its state is single-threaded; the ambassador says so at start
    /// and the report shows the count from its `ready` line).
    pub fn two_cpu() -> Vec<Kind> {
        let mut v = vec![Kind::Direct, Kind::Haproxy(2), Kind::Nginx(2)];
        for e in [
            "epoll --workers 1",
            "epoll --workers 2",
            "uring --workers 1",
            "uring --workers 2",
            "sockmap --workers 2",
        ] {
            v.push(Kind::Ambassador(e.into()));
        }
        v
    }

    /// Does `--rows` word `r` pick this row? By full name, by engine
    /// ("epoll" = "ambassador epoll" and every "ambassador epoll --…" row), or
    /// by peer ("haproxy" = "haproxy nbthread 2" too).
    pub fn picked_by(&self, r: &str) -> bool {
        let n = self.name();
        n == r
            || n == format!("ambassador {r}")
            || n.starts_with(&format!("ambassador {r} --"))
            || n.starts_with(&format!("{r} "))
    }
}

/// One forward: the proxy listens on `listen` and connects to `target` (both loopback).
#[derive(Clone, Copy, Debug)]
pub struct Fwd {
    pub listen: u16,
    pub target: u16,
}

/// A running row.
pub struct Running {
    pub kind: Kind,
    pub procs: Vec<Proc>,
    /// What the ambassador said in its `ready` line (its chosen engine).
    pub note: String,
    /// The worker count the ambassador said in its `ready` line (0 = not an ambassador).
    pub workers: usize,
}

impl Running {
    /// CPU seconds over all of the row's process groups.
    pub fn cpu_secs(&self) -> f64 {
        self.procs
            .iter()
            .map(|p| sys::group_cpu_secs(p.pid()))
            .sum()
    }
    pub fn rss_kib(&self) -> u64 {
        self.procs.iter().map(|p| sys::group_rss_kib(p.pid())).sum()
    }
    pub fn pss_kib(&self) -> u64 {
        self.procs.iter().map(|p| sys::group_pss_kib(p.pid())).sum()
    }
    /// Is every process still up? (A proxy that died mid-round fails its figures.)
    pub fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.procs {
            if !p.alive() {
                anyhow::bail!("{} died: {}", p.name, p.last_words());
            }
        }
        Ok(())
    }
}

/// Start `kind` on the CPU list `cpus` ("0", "0,1") for `fwds`. `dir` is a
/// scratch directory for configs. Err carries the row's own reason (an engine
/// that cannot start says why).
pub fn start(kind: &Kind, cpus: &str, fwds: &[Fwd], dir: &Path, amb_bin: &Path) -> Result<Running> {
    let (procs, note, workers) = match kind {
        Kind::Direct => (vec![], String::new(), 0),
        Kind::Socat => (socat::start(cpus, fwds)?, String::new(), 0),
        Kind::Haproxy(n) => (vec![haproxy::start(cpus, *n, fwds, dir)?], String::new(), 0),
        Kind::Nginx(n) => (vec![nginx::start(cpus, *n, fwds, dir)?], String::new(), 0),
        Kind::Ambassador(engine) => {
            let (p, ready) = ambassador::start(amb_bin, engine, cpus, fwds)?;
            (vec![p], ready.engine, ready.workers)
        }
    };
    Ok(Running {
        kind: kind.clone(),
        procs,
        note,
        workers,
    })
}

#[cfg(test)]
mod tests {
    use super::Kind;

    #[test]
    fn rows_are_picked_by_engine_or_peer_word() {
        let epoll2 = Kind::Ambassador("epoll --workers 2".into());
        assert!(epoll2.picked_by("epoll"));
        assert!(epoll2.picked_by("ambassador epoll --workers 2"));
        assert!(!epoll2.picked_by("uring"));
        assert!(!Kind::Ambassador("sockmap".into()).picked_by("sock"));
        assert!(Kind::Haproxy(2).picked_by("haproxy"));
        assert!(Kind::Haproxy(1).picked_by("haproxy"));
        assert!(!Kind::Nginx(2).picked_by("haproxy"));
        assert_eq!(Kind::Nginx(2).name(), "nginx worker_processes 2");
    }
}
