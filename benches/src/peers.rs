//! The rows of the table: what sits between client and server. One module per
//! peer; each turns a list of forwards into running, pinned processes.
//!
//! A row forwards every backend the workloads use (sockperf, iperf3, HTTP,
//! idle) at once, so that one process per row serves the whole round and the
//! rows can alternate figure by figure.

mod ambassador;
mod haproxy;
mod nginx;
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
    Haproxy,
    Nginx,
    /// `ambassador --mode <engine>`; "auto" included.
    Ambassador(String),
}

impl Kind {
    pub fn name(&self) -> String {
        match self {
            Kind::Direct => "direct".into(),
            Kind::Socat => "socat".into(),
            Kind::Haproxy => "haproxy".into(),
            Kind::Nginx => "nginx".into(),
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
            Kind::Haproxy => Some(haproxy::MAXCONN - 100),
            Kind::Socat => Some(2000),
            _ => None,
        }
    }

    pub fn all() -> Vec<Kind> {
        let mut v = vec![Kind::Direct, Kind::Socat, Kind::Haproxy, Kind::Nginx];
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

/// Start `kind` on `cpu` for `fwds`. `dir` is a scratch directory for configs.
/// Err carries the row's own reason (an engine that cannot start says why).
pub fn start(kind: &Kind, cpu: u32, fwds: &[Fwd], dir: &Path, amb_bin: &Path) -> Result<Running> {
    let (procs, note) = match kind {
        Kind::Direct => (vec![], String::new()),
        Kind::Socat => (socat::start(cpu, fwds)?, String::new()),
        Kind::Haproxy => (vec![haproxy::start(cpu, fwds, dir)?], String::new()),
        Kind::Nginx => (vec![nginx::start(cpu, fwds, dir)?], String::new()),
        Kind::Ambassador(engine) => {
            let (p, note) = ambassador::start(amb_bin, engine, cpu, fwds)?;
            (vec![p], note)
        }
    };
    Ok(Running {
        kind: kind.clone(),
        procs,
        note,
    })
}
