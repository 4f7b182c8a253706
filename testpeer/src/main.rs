//! `ambassador-testpeer`: the peer the kernel matrix runs next to the ambassador, inside each qemu
//! guest and natively on the host. One static binary, std + `libc` only, so that it runs from a
//! bare busybox initramfs. It is test infrastructure, so it is its own workspace crate
//! (`testpeer/`), not a binary of the shipped `ambassador` package.
//!
//! # Layout
//! - `suite`: the whole per-kernel run. Starts in-process upstreams on loopback, starts the
//!   ambassador once per cell (`--mode sockmap|uring|epoll|auto`, `auto` as an unprivileged user,
//!   under seccomp filters, and — with `--guest` only — with `kernel.io_uring_disabled=2`), runs
//!   the checks through it (bulk, speak-first both ways, half-close, connect storm, exit 0 on
//!   SIGTERM) and prints `KM ...` marker lines that `cargo xtask kernel-matrix` parses.
//! - `probe`: what the kernel offers (io_uring_setup, SOCKHASH, sk_skb load/attach/link), and the
//!   sockmap lifecycle fixes (`../shared/notes/sockmap.md` §2, §6) observed directly with raw
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

use std::io::{self};
use std::net::SocketAddr;
use std::time::Duration;

/// Socket read/write timeout for every check: TCG guests are ~20x slower than the host, so this
/// is generous, but it still bounds a stalled forward.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(15);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        usage();
    };
    let rest = &args[1..];
    let r = match cmd.as_str() {
        "suite" => suite(rest),
        "probe" => {
            probe();
            Ok(())
        }
        "echo" => serve(&opt(rest, "--listen"), Upstream::Echo),
        "speak-first-server" => serve(&opt(rest, "--listen"), Upstream::SpeakFirst),
        "half-close-server" => serve(&opt(rest, "--listen"), Upstream::HalfClose),
        "bulk" => check_bulk(addr(&opt(rest, "--connect")), num(rest, "--bytes", 4 << 20)),
        "speak-first-client" => check_speak_first_client(addr(&opt(rest, "--connect"))),
        "speak-first" => check_speak_first_server(addr(&opt(rest, "--connect"))),
        "half-close" => check_half_close(addr(&opt(rest, "--connect"))),
        "wrap" => wrap(rest),
        _ => usage(),
    };
    if let Err(e) = r {
        eprintln!("ambassador-testpeer: {e}");
        std::process::exit(1);
    }
}

pub(crate) fn usage() -> ! {
    eprintln!(
        "usage: ambassador-testpeer suite --ambassador PATH [--bytes N] [--storm N] [--cells a,b,..] [--guest]\n\
         \x20      ambassador-testpeer probe\n\
         \x20      ambassador-testpeer echo|speak-first-server|half-close-server --listen ADDR\n\
         \x20      ambassador-testpeer bulk|speak-first|speak-first-client|half-close --connect ADDR [--bytes N]\n\
         \x20      ambassador-testpeer wrap [--nonroot] [--seccomp|--seccomp-uring] -- CMD ARGS.."
    );
    std::process::exit(2)
}

pub(crate) fn opt(args: &[String], name: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| usage())
}

pub(crate) fn opt_or(args: &[String], name: &str, dflt: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| dflt.to_string())
}

pub(crate) fn num(args: &[String], name: &str, dflt: usize) -> usize {
    opt_or(args, name, &dflt.to_string())
        .parse()
        .unwrap_or_else(|_| usage())
}

pub(crate) fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| usage())
}

pub(crate) type Res<T> = Result<T, String>;

pub(crate) fn ctx<T>(r: io::Result<T>, what: &str) -> Res<T> {
    r.map_err(|e| format!("{what}: {e}"))
}
