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
//! reason for not running. Then it starts the harness once more and sends it
//! SIGTERM mid-figure: the harness must exit 143 having stopped every process
//! it started. No timing is asserted anywhere.

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
    // Inside this checkout's target dir: two checkouts on one machine (two CI
    // runs at once) must not remove each other's output.
    let out = crate::util::root().join("target/bench-smoke");
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
    stops_its_peers_on_sigterm(&bin)
}

/// A SIGTERM to the harness mid-run stops every process it started (its
/// peers live in process groups of their own, which the signal does not
/// reach): the harness exits 128 + 15, and each of its children is gone.
fn stops_its_peers_on_sigterm(bin: &std::path::Path) -> Result<()> {
    let harness = crate::util::target_dir().join("release/ambassador-bench");
    let out = std::env::temp_dir().join("ambassador-bench-sigterm");
    let mut child = Command::new(&harness)
        .args([
            "--passes",
            "same-core",
            "--rows",
            "direct",
            "--figures",
            "lat",
        ])
        .args([
            "--rounds",
            "1",
            "--secs",
            "30",
            "--syscall-conns",
            "0",
            "--out",
        ])
        .arg(&out)
        .arg("--bin")
        .arg(bin)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", harness.display()))?;
    let pid = child.id();
    // Wait (bounded) for its sockperf server: a peer in a group of its own
    // (not `sockperf --version`, the harness's check for the tool).
    let t0 = std::time::Instant::now();
    let peers = loop {
        let kids = children(pid);
        if kids
            .iter()
            .any(|(_, cmd)| cmd.starts_with("sockperf server"))
        {
            break kids;
        }
        if t0.elapsed() > std::time::Duration::from_secs(60) || child.try_wait()?.is_some() {
            let _ = child.kill();
            anyhow::bail!("bench sigterm check: no sockperf child within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // Safety: kill(2) of our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = child.wait()?;
    anyhow::ensure!(
        status.code() == Some(128 + libc::SIGTERM),
        "bench sigterm check: the harness exited {status}, expected 143"
    );
    let t0 = std::time::Instant::now();
    loop {
        let left: Vec<_> = peers.iter().filter(|(p, _)| alive(*p)).collect();
        if left.is_empty() {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "bench sigterm check: still running after the harness exited: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&out);
    eprintln!(
        "bench sigterm check: ok ({} of its processes stopped)",
        peers.len()
    );
    Ok(())
}

/// The processes whose parent is `pid`: (pid, command line).
fn children(pid: u32) -> Vec<(u32, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split at the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|x| x.parse::<u32>().ok());
        if ppid == Some(pid) {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            v.push((p, cmd.trim_end().to_string()));
        }
    }
    v
}

/// Is `pid` running (not gone, not a zombie waiting for its new parent)?
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
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
