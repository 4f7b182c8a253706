//! `cargo xtask bench [--full] [--smoke]`: the side-by-side benchmark (issue 5).
//!
//! Installs the peers it compares against when they are missing, builds the
//! `ambassador` binary in release (unless `$AMBASSADOR_BIN` names one), and runs
//! the harness, `cargo run -p ambassador-bench --release -- ...`, which writes
//! `benches/results/<date>-<pass>.{md,json}` + PNG plots and rewrites the results
//! section of `docs/benchmarks.md`.
//!
//! Three passes: same-core and cross-core (the proxy on one CPU) and two-cpu
//! (HAProxy `nbthread 2`, nginx `worker_processes 2`, `--workers 1` and `2`);
//! after each pass's timed rounds, syscalls per connection under strace.
//!
//! `smoke()` is what CI calls: one round, about a second per figure, into a
//! scratch directory (the two-cpu pass with only its throughput and
//! connection-rate figures, syscalls over 100 connections in the same-core
//! pass only); it checks only that every row produced every figure or its
//! reason for not running. No timing is asserted anywhere.

mod discovery;
mod gateway;
mod pki;

use crate::util::{apt_install, release_binary, root, run as run_cmd};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// Debian packages the benchmark runs (peers, load tools, the font for plot text).
pub const BENCH_PACKAGES: &[&str] = &[
    "socat",
    "haproxy",
    "nginx-light",
    "libnginx-mod-stream",
    "sockperf",
    "iperf3",
    "wrk",
    "strace", // syscalls per connection
    "fonts-dejavu-core",
    "util-linux", // taskset
];

#[derive(clap::Args)]
pub struct Args {
    /// The thorough run: 3 rounds, 3 s per figure (about 20 minutes here).
    #[arg(long)]
    pub full: bool,
    /// The CI smoke pass only (same as `smoke()`): 1 round, ~1 s per figure, scratch output.
    #[arg(long)]
    pub smoke: bool,
    /// Only these rows, comma-separated (direct, socat, haproxy, nginx, sockmap, uring, epoll, auto,
    /// "sockmap --splice always").
    #[arg(long)]
    pub rows: Option<String>,
    /// Only these passes, comma-separated (same-core, cross-core, two-cpu).
    #[arg(long)]
    pub passes: Option<String>,
    /// Connections each row's syscalls are counted over under strace (0 = skip that step).
    #[arg(long)]
    pub syscall_conns: Option<u32>,
    /// Override the number of rounds.
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Override the seconds per figure.
    #[arg(long)]
    pub secs: Option<u32>,
    /// Discovery at scale instead: etcd services x endpoints, one etcd forward per service
    /// (`bench/discovery.rs`); `$AMBASSADOR_BEFORE_BIN` adds a row for another binary.
    #[arg(long)]
    pub discovery: bool,
    /// With --discovery: how many services (and forwards).
    #[arg(long, default_value_t = 1000, requires = "discovery")]
    pub services: u16,
    /// With --discovery: endpoints per service.
    #[arg(long, default_value_t = 10, requires = "discovery")]
    pub per: u16,
    /// With --discovery: how many services are moved (and timed).
    #[arg(long, default_value_t = 200, requires = "discovery")]
    pub changes: u32,
    /// With --discovery: the ambassador dials etcd over TLS with a client certificate.
    #[arg(long, requires = "discovery")]
    pub tls: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.smoke {
        return smoke();
    }
    if a.discovery {
        return discovery(discovery::Scale {
            services: a.services,
            per: a.per,
            changes: a.changes,
            tls: a.tls,
        });
    }
    let bin = prepare()?;
    let mut extra: Vec<String> = vec![
        "--out".into(),
        "benches/results".into(),
        "--docs".into(),
        "docs/benchmarks.md".into(),
    ];
    if a.full {
        extra.push("--full".into());
    }
    for (flag, v) in [("--rows", a.rows), ("--passes", a.passes)] {
        if let Some(v) = v {
            extra.extend([flag.to_string(), v]);
        }
    }
    for (flag, v) in [
        ("--rounds", a.rounds),
        ("--secs", a.secs),
        ("--syscall-conns", a.syscall_conns),
    ] {
        if let Some(v) = v {
            extra.extend([flag.to_string(), v.to_string()]);
        }
    }
    harness(&bin, &extra)
}

/// CI's benchmark smoke: proves the harness runs end to end and fills every row
/// (or states the engine's reason). The harness itself exits non-zero, naming
/// the row and figure, when one is missing without a reason.
pub fn smoke() -> Result<()> {
    let bin = prepare()?;
    let out = std::env::temp_dir().join("ambassador-bench-smoke");
    let _ = std::fs::remove_dir_all(&out);
    harness(
        &bin,
        &["--smoke".into(), "--out".into(), out.display().to_string()],
    )?;
    let n = std::fs::read_dir(&out)
        .with_context(|| format!("reading {}", out.display()))?
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.ends_with(".json") || n.ends_with(".md") || n.ends_with(".png")
        })
        .count();
    anyhow::ensure!(
        n >= 5,
        "bench smoke wrote {n} files in {}, expected a .md, a .json and 3 plots",
        out.display()
    );
    eprintln!("bench smoke: ok ({n} files in {})", out.display());
    Ok(())
}

/// `--discovery`: RSS, threads, etcd connections and change-to-first-connection
/// p50/p99 (the driver: `bench/discovery.rs`), one JSON line per binary into
/// `benches/results/<date>-discovery.jsonl` (`-discovery-tls.jsonl` with `--tls`;
/// method: docs/benchmarks.md).
fn discovery(scale: discovery::Scale) -> Result<()> {
    apt_install(&["etcd-server", "iproute2", "openssl"])?;
    let bin = prepare()?;
    let date = String::from_utf8(Command::new("date").arg("-u").arg("+%F").output()?.stdout)?;
    let name = if scale.tls {
        "discovery-tls"
    } else {
        "discovery"
    };
    let out = root().join(format!("benches/results/{}-{name}.jsonl", date.trim()));
    let mut bins = vec![bin];
    if let Some(b) = std::env::var_os("AMBASSADOR_BEFORE_BIN") {
        bins.push(PathBuf::from(b));
    }
    let mut lines = String::new();
    for b in bins {
        let line = discovery::run(&b, scale)
            .with_context(|| format!("discovery bench of {}", b.display()))?;
        eprintln!("{line}");
        lines.push_str(&line);
        lines.push('\n');
    }
    std::fs::write(&out, lines).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// Install what is missing and find (or build) the ambassador binary.
fn prepare() -> Result<PathBuf> {
    apt_install(BENCH_PACKAGES)?;
    release_binary()
}

fn harness(bin: &std::path::Path, extra: &[String]) -> Result<()> {
    run_cmd(
        Command::new("cargo")
            .current_dir(root())
            .args(["run", "-q", "-p", "ambassador-bench", "--release", "--"])
            .arg("--bin")
            .arg(bin)
            .args(extra),
    )
}
