//! `ambassador-testpeer`: the peer the kernel matrix runs next to the ambassador, inside each qemu
//! guest and natively on the host. One static binary (std, `libc`, `clap`: no system library), so
//! that it runs from a bare busybox initramfs. It is test infrastructure, so it is its own workspace crate
//! (`testpeer/`), not a binary of the shipped `ambassador` package.
//!
//! # Layout
//! - `suite`: the whole per-kernel run. Starts in-process upstreams on loopback, starts the
//!   ambassador once per cell (`--mode sockmap|uring|epoll|auto`, `auto` as an unprivileged user,
//!   under seccomp filters, and — with `--guest` only — with `kernel.io_uring_disabled=2`), runs
//!   the checks through it (bulk, speak-first both ways, half-close, connect storm, exit 0 on
//!   SIGTERM) and prints `KM ...` marker lines that `cargo xtask kernel-matrix` parses.
//! - `probe`: what the kernel offers (io_uring_setup, SOCKHASH, sk_skb load/attach/link), and the
//!   sockmap lifecycle fixes (listed in `docs/kernels.md`, "probe"; the facts behind them in
//!   `docs/sockmap.md`, "Kernel facts the engine relies on") observed directly with raw
//!   `bpf()` calls, independent of the ambassador's sockmap engine.
//! - Single peers for poking by hand: `echo`, `speak-first-server`, `bulk`, `speak-first-client`,
//!   `half-close`, and `wrap` (run a command as uid 65534 without capabilities and/or with
//!   io_uring — and bpf, with `--seccomp` — refused by seccomp, like Docker's default profile).
//!
//! Modules: `suite` (the cells and marker lines), `probe` (raw `bpf()` probes), `peers` (the
//! upstream servers and client checks), `stream` (the deterministic byte streams), `confine`
//! (`wrap`: uid 65534 and seccomp); this file is the command line and small shared helpers.
//!
//! Every wait is bounded (socket timeouts, deadlines): a stuck engine shows up as a failed check,
//! never as a hung guest.
//!
//! Unsafe code: raw syscalls (`bpf`, `io_uring_setup`, `prctl(PR_SET_SECCOMP)`, `kill`) that std
//! does not wrap. Each site says why it is sound.

mod confine;
mod peers;
mod probe;
mod stream;
mod suite;

pub(crate) use confine::*;
pub(crate) use peers::*;
pub(crate) use probe::*;
pub(crate) use stream::*;
pub(crate) use suite::*;

use clap::Parser;
use std::io::{self};
use std::net::SocketAddr;
use std::time::Duration;

/// Socket read/write timeout for every check: TCG guests are ~20x slower than the host, so this
/// is generous, but it still bounds a stalled forward.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// The command line (clap): one subcommand per mode.
#[derive(Parser)]
#[command(
    name = "ambassador-testpeer",
    about = "The kernel matrix's peer next to the ambassador"
)]
enum Cli {
    /// The whole per-kernel run: every cell through the ambassador, `KM ...` lines out.
    Suite(SuiteArgs),
    /// What the kernel offers, and the sockmap fixes through raw bpf().
    Probe,
    /// An echo upstream.
    Echo(Listen),
    /// An upstream that speaks first.
    SpeakFirstServer(Listen),
    /// An upstream for the half-close check.
    HalfCloseServer(Listen),
    /// Bulk both ways through ADDR.
    Bulk {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 4 << 20)]
        bytes: usize,
    },
    /// The client speaks first through ADDR.
    SpeakFirstClient(Connect),
    /// The upstream speaks first through ADDR.
    SpeakFirst(Connect),
    /// Half-close through ADDR.
    HalfClose(Connect),
    /// Run CMD as uid 65534 and/or with io_uring (and bpf) refused by seccomp.
    Wrap(WrapArgs),
}

#[derive(clap::Args)]
pub(crate) struct Listen {
    #[arg(long)]
    listen: String,
}

#[derive(clap::Args)]
pub(crate) struct Connect {
    #[arg(long)]
    connect: SocketAddr,
}

/// `suite`'s options.
#[derive(clap::Args)]
pub(crate) struct SuiteArgs {
    /// The ambassador binary to test.
    #[arg(long)]
    pub ambassador: String,
    /// Bytes each way in the bulk check.
    #[arg(long, default_value_t = 4 << 20)]
    pub bytes: usize,
    /// Connections in the connect storm.
    #[arg(long, default_value_t = 40)]
    pub storm: usize,
    /// Bulk connections per cell, one after another (a soak: each carries `--bytes` both ways
    /// at once, every byte checked).
    #[arg(long, default_value_t = 1)]
    pub bulk_rounds: usize,
    /// The ambassador's `RUST_LOG` (a cell whose check failed prints its whole log).
    #[arg(long, default_value = "info")]
    pub log: String,
    /// Only these cells (comma-separated names; all if empty).
    #[arg(long, default_value = "")]
    pub cells: String,
    /// Running in a guest: cells that change a sysctl may run.
    #[arg(long)]
    pub guest: bool,
}

/// `wrap`'s options.
#[derive(clap::Args)]
pub(crate) struct WrapArgs {
    /// Run as uid/gid 65534 (no capabilities).
    #[arg(long)]
    pub nonroot: bool,
    /// Refuse io_uring and bpf (EPERM).
    #[arg(long, conflicts_with = "seccomp_uring")]
    pub seccomp: bool,
    /// Refuse io_uring only (EPERM).
    #[arg(long)]
    pub seccomp_uring: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub argv: Vec<String>,
}

fn main() {
    let r = match Cli::parse() {
        Cli::Suite(a) => suite(&a),
        Cli::Probe => {
            probe();
            Ok(())
        }
        Cli::Echo(l) => serve(&l.listen, Upstream::Echo),
        Cli::SpeakFirstServer(l) => serve(&l.listen, Upstream::SpeakFirst),
        Cli::HalfCloseServer(l) => serve(&l.listen, Upstream::HalfClose),
        Cli::Bulk { connect, bytes } => check_bulk(connect, bytes),
        Cli::SpeakFirstClient(c) => check_speak_first_client(c.connect),
        Cli::SpeakFirst(c) => check_speak_first_server(c.connect),
        Cli::HalfClose(c) => check_half_close(c.connect),
        Cli::Wrap(w) => wrap(&w),
    };
    if let Err(e) = r {
        eprintln!("ambassador-testpeer: {e}");
        std::process::exit(1);
    }
}

pub(crate) type Res<T> = Result<T, String>;

pub(crate) fn ctx<T>(r: io::Result<T>, what: &str) -> Res<T> {
    r.map_err(|e| format!("{what}: {e}"))
}
