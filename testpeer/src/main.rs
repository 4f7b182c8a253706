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
//! Every wait is bounded (socket timeouts, deadlines): a stuck engine shows up as a failed check,
//! never as a hung guest.
//!
//! Unsafe code: raw syscalls (`bpf`, `io_uring_setup`, `prctl(PR_SET_SECCOMP)`, `kill`) that std
//! does not wrap. Each site says why it is sound.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Socket read/write timeout for every check: TCG guests are ~20x slower than the host, so this
/// is generous, but it still bounds a stalled forward.
const IO_TIMEOUT: Duration = Duration::from_secs(15);

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

fn usage() -> ! {
    eprintln!(
        "usage: ambassador-testpeer suite --ambassador PATH [--bytes N] [--storm N] [--cells a,b,..] [--guest]\n\
         \x20      ambassador-testpeer probe\n\
         \x20      ambassador-testpeer echo|speak-first-server|half-close-server --listen ADDR\n\
         \x20      ambassador-testpeer bulk|speak-first|speak-first-client|half-close --connect ADDR [--bytes N]\n\
         \x20      ambassador-testpeer wrap [--nonroot] [--seccomp|--seccomp-uring] -- CMD ARGS.."
    );
    std::process::exit(2)
}

fn opt(args: &[String], name: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| usage())
}

fn opt_or(args: &[String], name: &str, dflt: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| dflt.to_string())
}

fn num(args: &[String], name: &str, dflt: usize) -> usize {
    opt_or(args, name, &dflt.to_string())
        .parse()
        .unwrap_or_else(|_| usage())
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| usage())
}

type Res<T> = Result<T, String>;

fn ctx<T>(r: io::Result<T>, what: &str) -> Res<T> {
    r.map_err(|e| format!("{what}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Pseudo-random bytes: xorshift64*, so both ends can regenerate and compare a stream byte by byte.

struct Prng(u64);

impl Prng {
    fn new(seed: u64) -> Self {
        Prng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Write `n` bytes of the stream `seed` (chunks of 64 KiB; chunk boundaries don't change the
/// stream because every chunk but the last is a multiple of 8 bytes).
fn write_stream(w: &mut impl Write, seed: u64, n: usize) -> io::Result<()> {
    let mut g = Prng::new(seed);
    let mut buf = vec![0u8; 64 << 10];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len());
        g.fill(&mut buf[..k]);
        w.write_all(&buf[..k])?;
        left -= k;
    }
    Ok(())
}

/// Read exactly `n` bytes and compare them with the stream `seed`; report the first difference.
fn verify_stream(r: &mut impl Read, seed: u64, n: usize) -> Res<()> {
    let mut g = Prng::new(seed);
    let mut want = vec![0u8; 64 << 10];
    let mut got = vec![0u8; 64 << 10];
    let mut off = 0usize;
    while off < n {
        let k = (n - off).min(want.len());
        g.fill(&mut want[..k]);
        let mut have = 0;
        while have < k {
            match r.read(&mut got[have..k]) {
                Ok(0) => return Err(format!("EOF after {} of {n} bytes", off + have)),
                Ok(m) => have += m,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read after {} of {n} bytes: {e}", off + have)),
            }
        }
        if let Some(i) = (0..k).find(|&i| want[i] != got[i]) {
            return Err(format!("byte {} differs", off + i));
        }
        off += k;
    }
    Ok(())
}

/// Read until EOF (bounded by the socket timeout); return how many bytes came.
fn read_to_eof(r: &mut impl Read) -> io::Result<usize> {
    let mut buf = [0u8; 16 << 10];
    let mut n = 0;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(m) => n += m,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Upstreams: each runs on its own loopback listener, one thread per connection.

#[derive(Clone, Copy)]
enum Upstream {
    /// Echo everything back; EOF → shut down our write side.
    Echo,
    /// Send `BANNER_LEN` bytes of stream `SEED_BANNER` before reading anything, then echo.
    SpeakFirst,
    /// Read the client's stream to EOF (verifying it), then answer `REPLY_LEN` bytes and close.
    HalfClose,
}

const SEED_BANNER: u64 = 0xB4;
const BANNER_LEN: usize = 4096;
const SEED_HALF_UP: u64 = 0x4A1F;
const HALF_UP_LEN: usize = 1 << 20;
const SEED_HALF_DOWN: u64 = 0xD0;
const REPLY_LEN: usize = 256 << 10;

fn serve(listen: &str, kind: Upstream) -> Res<()> {
    let l = ctx(TcpListener::bind(listen), "bind")?;
    serve_on(l, kind);
    Ok(())
}

fn serve_on(l: TcpListener, kind: Upstream) {
    for s in l.incoming().flatten() {
        thread::spawn(move || {
            let _ = handle_upstream(s, kind);
        });
    }
}

fn spawn_upstream(kind: Upstream) -> Res<SocketAddr> {
    let l = ctx(TcpListener::bind("127.0.0.1:0"), "bind upstream")?;
    let a = ctx(l.local_addr(), "local_addr")?;
    thread::spawn(move || serve_on(l, kind));
    Ok(a)
}

fn handle_upstream(mut s: TcpStream, kind: Upstream) -> Res<()> {
    s.set_read_timeout(Some(IO_TIMEOUT)).ok();
    s.set_write_timeout(Some(IO_TIMEOUT)).ok();
    match kind {
        Upstream::Echo | Upstream::SpeakFirst => {
            if let Upstream::SpeakFirst = kind {
                ctx(write_stream(&mut s, SEED_BANNER, BANNER_LEN), "banner")?;
            }
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = ctx(s.read(&mut buf), "echo read")?;
                if n == 0 {
                    let _ = s.shutdown(Shutdown::Write);
                    return Ok(());
                }
                ctx(s.write_all(&buf[..n]), "echo write")?;
            }
        }
        Upstream::HalfClose => {
            // The verdict travels back in the reply header: "ok\n" or "bad <why>\n".
            let verdict = match verify_stream(&mut s, SEED_HALF_UP, HALF_UP_LEN) {
                Ok(()) => match read_to_eof(&mut s) {
                    Ok(0) => "ok".to_string(),
                    Ok(n) => format!("bad {n} extra bytes before EOF"),
                    Err(e) => format!("bad no EOF from the client's half-close: {e}"),
                },
                Err(e) => format!("bad upstream read: {e}"),
            };
            let verdict = verdict.replace('\n', " ");
            ctx(
                s.write_all(format!("{verdict}\n").as_bytes()),
                "reply header",
            )?;
            ctx(write_stream(&mut s, SEED_HALF_DOWN, REPLY_LEN), "reply")?;
            let _ = s.shutdown(Shutdown::Write);
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client checks. Each returns Ok(detail) or Err(why).

fn connect(a: SocketAddr) -> Res<TcpStream> {
    let s = ctx(TcpStream::connect_timeout(&a, IO_TIMEOUT), "connect")?;
    s.set_read_timeout(Some(IO_TIMEOUT)).ok();
    s.set_write_timeout(Some(IO_TIMEOUT)).ok();
    Ok(s)
}

/// `n` pseudo-random bytes through an echo upstream, written by one thread while the other reads:
/// both directions carry the full stream at the same time, compared byte for byte.
fn check_bulk(a: SocketAddr, n: usize) -> Res<()> {
    let s = connect(a)?;
    let mut w = ctx(s.try_clone(), "clone")?;
    let t0 = Instant::now();
    let writer = thread::spawn(move || write_stream(&mut w, 0xB01C, n));
    let mut r = s;
    let v = verify_stream(&mut r, 0xB01C, n);
    let wr = writer.join().map_err(|_| "writer panicked".to_string())?;
    ctx(wr, "write")?;
    v?;
    let _ = r.shutdown(Shutdown::Write);
    match read_to_eof(&mut r) {
        Ok(0) => {}
        Ok(k) => return Err(format!("{k} extra bytes after the stream")),
        Err(e) => return Err(format!("no EOF after our half-close: {e}")),
    }
    println!("# bulk {n} bytes each way in {:?}", t0.elapsed());
    Ok(())
}

/// The upstream speaks first: its banner must arrive although the client has sent nothing.
fn check_speak_first_server(a: SocketAddr) -> Res<()> {
    let mut s = connect(a)?;
    verify_stream(&mut s, SEED_BANNER, BANNER_LEN).map_err(|e| format!("banner: {e}"))?;
    ctx(s.write_all(b"ping"), "write")?;
    let mut b = [0u8; 4];
    ctx(s.read_exact(&mut b), "echo after banner")?;
    if &b != b"ping" {
        return Err("wrong echo after banner".into());
    }
    Ok(())
}

/// The client speaks first, right after connect, before the proxy can have set anything up.
fn check_speak_first_client(a: SocketAddr) -> Res<()> {
    let mut s = connect(a)?;
    let mut w = ctx(s.try_clone(), "clone")?;
    ctx(write_stream(&mut w, 0x5F, 1000), "write")?;
    verify_stream(&mut s, 0x5F, 1000)?;
    // And a second message once everything is surely established.
    ctx(s.write_all(b"again"), "write")?;
    let mut b = [0u8; 5];
    ctx(s.read_exact(&mut b), "second echo")?;
    if &b != b"again" {
        return Err("wrong second echo".into());
    }
    Ok(())
}

/// Many short connections, each speaking first the instant it is connected (client side) or
/// being spoken to first (server side), 4 at a time: the race between bytes arriving and the
/// engine setting the connection up (for sockmap: insert + kick) gets many chances to lose data.
fn check_storm(echo: SocketAddr, first: SocketAddr, rounds: usize) -> Res<()> {
    const PARALLEL: usize = 4;
    let workers: Vec<_> = (0..PARALLEL)
        .map(|w| {
            thread::spawn(move || -> Res<()> {
                for i in 0..rounds.div_ceil(PARALLEL) {
                    let seed = (w * 1000 + i) as u64 + 7;
                    let mut s = connect(echo)?;
                    let mut wr = ctx(s.try_clone(), "clone")?;
                    ctx(write_stream(&mut wr, seed, 300), "write")?;
                    verify_stream(&mut s, seed, 300)
                        .map_err(|e| format!("client-first #{i}: {e}"))?;
                    let mut s = connect(first)?;
                    verify_stream(&mut s, SEED_BANNER, BANNER_LEN)
                        .map_err(|e| format!("server-first #{i}: {e}"))?;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "worker panicked".to_string())??;
    }
    Ok(())
}

/// Client sends 1 MiB then shuts down its write side; the upstream must see every byte then EOF,
/// and its reply (sent after our FIN) must still reach us, followed by EOF.
fn check_half_close(a: SocketAddr) -> Res<()> {
    let mut s = connect(a)?;
    ctx(write_stream(&mut s, SEED_HALF_UP, HALF_UP_LEN), "write")?;
    ctx(s.shutdown(Shutdown::Write), "shutdown")?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    ctx(r.read_line(&mut line), "reply header")?;
    let line = line.trim_end();
    if line != "ok" {
        return Err(format!(
            "upstream: {}",
            if line.is_empty() {
                "EOF, no reply"
            } else {
                line
            }
        ));
    }
    verify_stream(&mut r, SEED_HALF_DOWN, REPLY_LEN).map_err(|e| format!("reply: {e}"))?;
    match read_to_eof(&mut r) {
        Ok(0) => Ok(()),
        Ok(k) => Err(format!("{k} extra bytes after reply")),
        Err(e) => Err(format!("no EOF after reply: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// `wrap`: run a command unprivileged and/or under seccomp.

/// Which syscalls the seccomp wrapper refuses.
#[derive(Clone, Copy, PartialEq)]
enum Seccomp {
    Off,
    /// io_uring_setup/enter/register (425-427) fail with EPERM.
    Uring,
    /// io_uring and bpf (321) fail with EPERM: what Docker's default profile does to a
    /// container without CAP_SYS_ADMIN/CAP_BPF.
    UringBpf,
}

/// The seccomp program (classic BPF) for `which`: refused syscalls return EPERM, everything
/// else is allowed.
fn seccomp_filter(which: Seccomp) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const ALLOW: u32 = 0x7FFF_0000;
    const ERRNO_EPERM: u32 = 0x0005_0000 | libc::EPERM as u32;
    let st = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    vec![
        st(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
        st(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        st(RET_K, 0, 0, ALLOW),
        st(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        st(JEQ_K, 4, 0, 425),
        st(JEQ_K, 3, 0, 426),
        st(JEQ_K, 2, 0, 427),
        // bpf: refused only for UringBpf (otherwise compare against an impossible number).
        st(
            JEQ_K,
            1,
            0,
            if which == Seccomp::UringBpf {
                321
            } else {
                u32::MAX
            },
        ),
        st(RET_K, 0, 0, ALLOW),
        st(RET_K, 0, 0, ERRNO_EPERM),
    ]
}

/// Apply the wrapper options to `cmd`: `nonroot` switches to uid/gid 65534 (setuid from root
/// clears the permitted, effective and ambient capability sets); `seccomp` installs the filter
/// above right before exec.
fn confine(cmd: &mut Command, nonroot: bool, seccomp: Seccomp) {
    if nonroot {
        // std calls setgroups(0) before setuid when running as root.
        cmd.uid(65534).gid(65534);
    }
    if seccomp != Seccomp::Off {
        let filter = seccomp_filter(seccomp);
        // Safety: the closure only makes async-signal-safe prctl() calls on memory captured
        // before fork; `filter` outlives the call.
        unsafe {
            cmd.pre_exec(move || {
                let prog = libc::sock_fprog {
                    len: filter.len() as u16,
                    filter: filter.as_ptr() as *mut _,
                };
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER,
                        &prog as *const libc::sock_fprog,
                    ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

fn wrap(args: &[String]) -> Res<()> {
    let sep = args
        .iter()
        .position(|a| a == "--")
        .unwrap_or_else(|| usage());
    let flags = &args[..sep];
    let argv = &args[sep + 1..];
    if argv.is_empty() {
        usage();
    }
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    let has = |f: &str| flags.iter().any(|x| x == f);
    let seccomp = if has("--seccomp") {
        Seccomp::UringBpf
    } else if has("--seccomp-uring") {
        Seccomp::Uring
    } else {
        Seccomp::Off
    };
    confine(&mut cmd, has("--nonroot"), seccomp);
    Err(format!("exec {}: {}", argv[0], cmd.exec()))
}

// ---------------------------------------------------------------------------------------------
// `suite`: one ambassador per cell, the checks through it, marker lines out.

/// A cell of the matrix: the mode passed to the ambassador and how it is confined.
struct Cell {
    name: &'static str,
    mode: &'static str,
    /// `--splice` policy for the sockmap engine, and extra environment.
    splice: &'static str,
    env: &'static [(&'static str, &'static str)],
    nonroot: bool,
    seccomp: Seccomp,
    /// Value written to `kernel.io_uring_disabled` for this cell (guests only: the host's
    /// sysctls belong to everyone on the machine).
    uring_sysctl: Option<&'static str>,
}

const CELLS: &[Cell] = &[
    Cell {
        name: "sockmap",
        mode: "sockmap",
        nonroot: false,
        seccomp: Seccomp::Off,
        uring_sysctl: None,
        splice: "always",
        env: &[],
    },
    Cell {
        name: "uring",
        mode: "uring",
        nonroot: false,
        seccomp: Seccomp::Off,
        uring_sysctl: None,
        splice: "always",
        env: &[],
    },
    Cell {
        name: "epoll",
        mode: "epoll",
        nonroot: false,
        seccomp: Seccomp::Off,
        uring_sysctl: None,
        splice: "always",
        env: &[],
    },
    Cell {
        name: "auto",
        mode: "auto",
        nonroot: false,
        seccomp: Seccomp::Off,
        uring_sysctl: None,
        splice: "always",
        env: &[],
    },
    Cell {
        name: "auto-nonroot",
        mode: "auto",
        nonroot: true,
        seccomp: Seccomp::Off,
        uring_sysctl: None,
        splice: "always",
        env: &[],
    },
    Cell {
        name: "auto-seccomp",
        mode: "auto",
        nonroot: false,
        seccomp: Seccomp::UringBpf,
        uring_sysctl: None,
        splice: "always",
        env: &[],
    },
    Cell {
        name: "auto-nonroot-nouring",
        mode: "auto",
        nonroot: true,
        seccomp: Seccomp::Uring,
        uring_sysctl: None,
        splice: "always",
        env: &[],
    },
    Cell {
        name: "auto-nonroot-sysctl",
        mode: "auto",
        nonroot: true,
        seccomp: Seccomp::Off,
        uring_sysctl: Some("2"),
        splice: "always",
        env: &[],
    },
    // The default policy, promoting at the first quiet point so that the
    // checks run through promotions.
    Cell {
        name: "sockmap-adaptive",
        mode: "sockmap",
        nonroot: false,
        seccomp: Seccomp::Off,
        uring_sysctl: None,
        splice: "adaptive",
        env: &[("AMBASSADOR_SOCKMAP_PROMOTE_TURNS", "0")],
    },
    // Every spliced connection leaves the kernel as soon as a byte is in
    // flight: the way out of the maps (to the copy loop) on every kernel.
    Cell {
        name: "sockmap-leave",
        mode: "sockmap",
        nonroot: false,
        seccomp: Seccomp::Off,
        uring_sysctl: None,
        splice: "always",
        env: &[("AMBASSADOR_SOCKMAP_INFLIGHT", "0")],
    },
];

/// One line of free text for a marker. Marker values are single tokens, except `detail=` and
/// `reason=`, which are always last on the line and run to its end, so they may hold spaces.
fn clean(s: &str) -> String {
    s.replace(['\n', '\r'], " ").trim().to_string()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            // CSI: ESC [ ... final byte in @..~
            if it.peek() == Some(&'[') {
                it.next();
                for d in it.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Value of `key=` in a log line: quoted ("..."), or up to the next space, or (for `reason`) to
/// the end of the line.
fn field(line: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    let mut from = 0;
    let i = loop {
        let i = from + line[from..].find(&pat)?;
        if i == 0 || line.as_bytes()[i - 1] == b' ' || line.as_bytes()[i - 1] == b'{' {
            break i;
        }
        from = i + pat.len();
    };
    let v = &line[i + pat.len()..];
    if let Some(q) = v.strip_prefix('"') {
        let end = q.find('"').unwrap_or(q.len());
        return Some(q[..end].to_string());
    }
    if key == "reason" {
        return Some(v.trim().to_string());
    }
    Some(v.split_whitespace().next().unwrap_or("").to_string())
}

/// A log line without its timestamp, level and target: `2026-..Z ERROR ambassador: msg` → `msg`.
fn tidy(line: &str) -> String {
    let mut rest = line.trim();
    for _ in 0..3 {
        let Some((head, tail)) = rest.split_once(' ') else {
            break;
        };
        let is_ts = head.len() > 10 && head.as_bytes()[0].is_ascii_digit() && head.contains('T');
        let is_level = ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&head);
        let is_target = head.ends_with(':') && !head.contains('=');
        if is_ts || is_level || is_target {
            rest = tail.trim_start();
        } else {
            break;
        }
    }
    rest.to_string()
}

/// One check through a running ambassador.
type CheckFn<'a> = Box<dyn Fn() -> Res<()> + 'a>;

struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

/// Three distinct free loopback ports for the ambassador's listeners. All three sockets are
/// held until all three are known, so the kernel cannot hand out the same port twice. (Another
/// process may still take one before the ambassador binds it: `run_cell` retries once.)
fn free_ports() -> Res<[u16; 3]> {
    let ls = [
        ctx(TcpListener::bind("127.0.0.1:0"), "bind")?,
        ctx(TcpListener::bind("127.0.0.1:0"), "bind")?,
        ctx(TcpListener::bind("127.0.0.1:0"), "bind")?,
    ];
    let mut ports = [0u16; 3];
    for (p, l) in ports.iter_mut().zip(&ls) {
        *p = ctx(l.local_addr(), "local_addr")?.port();
    }
    Ok(ports)
}

/// Start the ambassador and wait (bounded) for `ready` or for its exit.
fn start_ambassador(
    bin: &str,
    cell: &Cell,
    forwards: &[(u16, SocketAddr)],
) -> Res<(Running, Option<String>, Option<ExitStatus>)> {
    let mut cmd = Command::new(bin);
    cmd.arg("--mode").arg(cell.mode);
    // `always` splices every connection (the default `adaptive` policy
    // would leave these short checks in userspace): the matrix proves the
    // kernel path; the adaptive cell promotes at the first quiet point.
    cmd.args(["--splice", cell.splice]);
    cmd.envs(cell.env.iter().copied());
    for (p, up) in forwards {
        cmd.arg("--forward").arg(format!("127.0.0.1:{p}={up}"));
    }
    cmd.env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("AMBASSADOR_MODE");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    confine(&mut cmd, cell.nonroot, cell.seccomp);
    let mut child = ctx(cmd.spawn(), &format!("spawn {bin}"))?;
    let err = child.stderr.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    {
        let lines = lines.clone();
        thread::spawn(move || {
            for l in BufReader::new(err).lines() {
                let Ok(l) = l else { break };
                let l = strip_ansi(&l);
                if l.contains("ready forwards=") {
                    let _ = tx.send(field(&l, "engine"));
                }
                lines.lock().unwrap().push(l);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(engine) = rx.try_recv() {
            return Ok((
                Running { child, lines },
                Some(engine.unwrap_or_default()),
                None,
            ));
        }
        if let Ok(Some(st)) = child.try_wait() {
            thread::sleep(Duration::from_millis(100)); // let the reader drain stderr
            return Ok((Running { child, lines }, None, Some(st)));
        }
        if Instant::now() > deadline {
            return Ok((Running { child, lines }, None, None));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, then a bounded wait, then SIGKILL.
fn stop(r: &mut Running) -> Option<ExitStatus> {
    // Safety: kill(2) on the pid of our own, not yet reaped, child.
    unsafe { libc::kill(r.child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(st)) = r.child.try_wait() {
            return Some(st);
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = r.child.kill();
    let _ = r.child.wait();
    None
}

fn suite(args: &[String]) -> Res<()> {
    let bin = opt(args, "--ambassador");
    let bytes = num(args, "--bytes", 4 << 20);
    let storm = num(args, "--storm", 40);
    let only = opt_or(args, "--cells", "");
    let guest = args.iter().any(|a| a == "--guest");
    let echo = spawn_upstream(Upstream::Echo)?;
    let first = spawn_upstream(Upstream::SpeakFirst)?;
    let half = spawn_upstream(Upstream::HalfClose)?;
    println!("KM suite start bytes={bytes} uid={}", unsafe {
        libc::getuid()
    });
    for cell in CELLS {
        if !only.is_empty() && !only.split(',').any(|c| c == cell.name) {
            continue;
        }
        let Some(value) = cell.uring_sysctl else {
            run_cell(&bin, cell, bytes, storm, [echo, first, half])?;
            continue;
        };
        const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";
        let old = match std::fs::read_to_string(SYSCTL) {
            _ if !guest => {
                println!(
                    "KM na cell={} detail=changes a sysctl: guests only",
                    cell.name
                );
                continue;
            }
            Err(e) => {
                println!("KM na cell={} detail={SYSCTL}: {e}", cell.name);
                continue;
            }
            Ok(v) => v,
        };
        ctx(std::fs::write(SYSCTL, value), SYSCTL)?;
        let r = run_cell(&bin, cell, bytes, storm, [echo, first, half]);
        ctx(std::fs::write(SYSCTL, old.trim()), SYSCTL)?;
        r?;
    }
    println!("KM suite end");
    Ok(())
}

fn run_cell(bin: &str, cell: &Cell, bytes: usize, storm: usize, ups: [SocketAddr; 3]) -> Res<()> {
    let t0 = Instant::now();
    let mut attempt = 0;
    let (ports, mut run, ready, exited) = loop {
        let ports = free_ports()?;
        let fw: Vec<(u16, SocketAddr)> = ports.iter().copied().zip(ups).collect();
        let (run, ready, exited) = start_ambassador(bin, cell, &fw)?;
        let lost_port = ready.is_none()
            && run
                .lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("in use"));
        attempt += 1;
        if !lost_port || attempt == 2 {
            break (ports, run, ready, exited);
        }
        println!(
            "# {}: a listen port was taken meanwhile; retrying with new ports",
            cell.name
        );
    };
    let c = cell.name;
    let engine = ready.clone();
    if let Some(engine) = &ready {
        let via = |i: usize| SocketAddr::from(([127, 0, 0, 1], ports[i]));
        let checks: [(&str, CheckFn); 5] = [
            ("bulk", Box::new(move || check_bulk(via(0), bytes))),
            (
                "speak-first-server",
                Box::new(move || check_speak_first_server(via(1))),
            ),
            (
                "speak-first-client",
                Box::new(move || check_speak_first_client(via(0))),
            ),
            ("half-close", Box::new(move || check_half_close(via(2)))),
            (
                "connect-storm",
                Box::new(move || check_storm(via(0), via(1), storm)),
            ),
        ];
        for (name, f) in checks {
            let t = Instant::now();
            let r = f();
            let ms = t.elapsed().as_millis();
            match r {
                Ok(()) => {
                    println!("KM check cell={c} engine={engine} check={name} ok=1 ms={ms} detail=")
                }
                Err(e) => println!(
                    "KM check cell={c} engine={engine} check={name} ok=0 ms={ms} detail={}",
                    clean(&e)
                ),
            }
        }
    }
    let end = if exited.is_none() {
        stop(&mut run)
    } else {
        exited
    };
    thread::sleep(Duration::from_millis(50));
    let lines = run.lines.lock().unwrap().clone();
    for l in &lines {
        if l.contains("engine skipped") {
            println!(
                "KM skipped cell={c} engine={} reason={}",
                field(l, "engine").unwrap_or_default(),
                clean(&field(l, "reason").unwrap_or_default())
            );
        }
        if l.contains("engine chosen") {
            println!(
                "KM chosen cell={c} engine={} mode={}",
                field(l, "engine").unwrap_or_default(),
                field(l, "mode").unwrap_or_default()
            );
        }
    }
    let code = match end {
        Some(st) => st
            .code()
            .map(|c| c.to_string())
            .unwrap_or_else(|| format!("{st}")),
        None => "killed".to_string(),
    };
    // The last non-empty stderr line is the reason when it did not start.
    let last = lines
        .iter()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| tidy(l))
        .unwrap_or_default();
    // The `stats` lines logged at exit: how many bytes the kernel spliced, and how many
    // connections fell back to userspace copying. A sockmap cell that spliced nothing is a
    // silent fallback, not a working engine.
    let mut totals = [0u64; 4];
    for l in lines.iter().filter(|l| l.contains("stats forward=")) {
        let n = |k: &str| field(l, k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        totals[0] += n("spliced_to_upstream") + n("spliced_to_client");
        totals[1] += n("splice_fallbacks");
        totals[2] += n("errors");
        totals[3] += n("conns_total");
    }
    println!(
        "KM cell cell={c} ready={} engine={} exit={} ms={} spliced={} splice_fallbacks={} errors={} conns={} detail={}",
        ready.is_some() as u8,
        engine.unwrap_or_else(|| "none".into()),
        code.replace(' ', "_"),
        t0.elapsed().as_millis(),
        totals[0],
        totals[1],
        totals[2],
        totals[3],
        if ready.is_some() {
            String::new()
        } else {
            clean(&last)
        }
    );
    for l in lines.iter().take(40) {
        println!("# {c}: {l}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// `probe`: kernel features and the sockmap fixes, with raw bpf().

fn errno_str(r: i64) -> String {
    if r >= 0 {
        "ok".into()
    } else {
        io::Error::last_os_error().to_string().replace(' ', "_")
    }
}

fn probe() {
    let mut rel = String::new();
    if let Ok(mut f) = std::fs::File::open("/proc/sys/kernel/osrelease") {
        let _ = f.read_to_string(&mut rel);
    }
    println!("KM kernel release={}", rel.trim());
    // Control for the EAGAIN count below: 20 loads before this process ever touched io_uring.
    let eagain = (0..20)
        .filter(|_| sockmap::load_once().contains("os_error_11"))
        .count();
    println!("KM feature name=sk_skb_load_eagain_no_io_uring result={eagain}/20");
    // sk_skb program load before and after an io_uring instance existed in this process: on
    // 6.1 the verifier returned EAGAIN (its signal_pending() bail-out) after io_uring use.
    println!(
        "KM feature name=sk_skb_load_before_io_uring result={}",
        sockmap::load_once()
    );
    // io_uring_setup(1, &params): fd on success.
    let mut params = [0u8; 120];
    // Safety: io_uring_setup writes at most sizeof(struct io_uring_params) = 120 bytes.
    let r = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    println!("KM feature name=io_uring_setup result={}", errno_str(r));
    if r >= 0 {
        unsafe { libc::close(r as i32) };
    }
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "absent".into());
    println!("KM feature name=io_uring_disabled_sysctl result={sysctl}");
    println!(
        "KM feature name=sk_skb_load_after_io_uring result={}",
        sockmap::load_once()
    );
    // The same, 20 times in a row, right after closing a fresh ring: how often EAGAIN comes.
    let mut eagain = 0;
    for _ in 0..20 {
        // Safety: as above.
        let r = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
        if r >= 0 {
            unsafe { libc::close(r as i32) };
        }
        if sockmap::load_once().contains("os_error_11") {
            eagain += 1;
        }
    }
    println!("KM feature name=sk_skb_load_eagain_after_ring_close result={eagain}/20");
    let up = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "absent".into());
    println!("KM feature name=unprivileged_bpf_disabled result={up}");
    sockmap::run();
}

/// Raw `bpf()` sockmap probe: the two-SOCKHASH verdict-only design of `sockmap.md`, checked
/// piece by piece on the running kernel. A port of `sockmap-experiments/probe.c`, cut down to what
/// decides whether the engine can work (and sized for TCG).
mod sockmap {
    use super::*;

    #[repr(C, align(8))]
    struct Attr([u8; 128]);

    impl Attr {
        fn new() -> Self {
            Attr([0; 128])
        }
        fn u32(&mut self, off: usize, v: u32) -> &mut Self {
            self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
            self
        }
        fn u64(&mut self, off: usize, v: u64) -> &mut Self {
            self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
            self
        }
    }

    fn bpf(cmd: i32, a: &mut Attr) -> i64 {
        // Safety: `a` is a zeroed 128-byte bpf_attr; the kernel reads/writes within its size.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, a.0.as_mut_ptr(), 128u32) }
    }

    fn err() -> String {
        io::Error::last_os_error().to_string()
    }

    fn map_create(ty: u32, ks: u32, vs: u32, max: u32) -> Res<i32> {
        let r = bpf(0, Attr::new().u32(0, ty).u32(4, ks).u32(8, vs).u32(12, max));
        if r < 0 {
            Err(format!("map_create type {ty}: {}", err()))
        } else {
            Ok(r as i32)
        }
    }

    fn map_update(fd: i32, k: &u64, v: &u32) -> Res<()> {
        let mut a = Attr::new();
        a.u32(0, fd as u32)
            .u64(8, k as *const u64 as u64)
            .u64(16, v as *const u32 as u64);
        if bpf(2, &mut a) < 0 {
            Err(err())
        } else {
            Ok(())
        }
    }

    fn map_lookup(fd: i32, k: &u32, v: &mut [u64; 4]) {
        let mut a = Attr::new();
        a.u32(0, fd as u32)
            .u64(8, k as *const u32 as u64)
            .u64(16, v.as_mut_ptr() as u64);
        bpf(1, &mut a);
    }

    /// One classic insn: code, dst, src, off, imm.
    fn ins(p: &mut Vec<u64>, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        let v = code as u64
            | (((dst & 0xf) | (src << 4)) as u64) << 8
            | ((off as u16) as u64) << 16
            | ((imm as u32) as u64) << 32;
        p.push(v);
    }

    /// The verdict program: count calls/bytes/zero-length skbs/redirect misses in an ARRAY map,
    /// zero-length skb → `zero_verdict` (0 = SK_DROP, 1 = SK_PASS), else redirect (flags 0) to
    /// PEERS[cookie], miss → SK_PASS.
    fn load_prog_once(stats: i32, peers: i32, zero_verdict: i32, flags: i32) -> Res<i32> {
        const ALU64_MOV_X: u8 = 0xbf;
        const ALU64_MOV_K: u8 = 0xb7;
        const ALU64_ADD_K: u8 = 0x07;
        const ST_W: u8 = 0x62;
        const STX_DW: u8 = 0x7b;
        const LDX_W: u8 = 0x61;
        const LD_DW_IMM: u8 = 0x18;
        const CALL: u8 = 0x85;
        const EXIT: u8 = 0x95;
        const JEQ_K: u8 = 0x15;
        const JNE_K: u8 = 0x55;
        const ATOMIC_DW: u8 = 0xdb; // BPF_STX | BPF_DW | BPF_ATOMIC, imm = BPF_ADD
        let mut p = Vec::new();
        let ld_map = |p: &mut Vec<u64>, dst: u8, fd: i32| {
            ins(p, LD_DW_IMM, dst, 1, 0, fd);
            ins(p, 0, 0, 0, 0, 0);
        };
        ins(&mut p, ALU64_MOV_X, 6, 1, 0, 0); // r6 = ctx
        ins(&mut p, ST_W, 10, 0, -4, 0); // key 0
        ins(&mut p, ALU64_MOV_X, 2, 10, 0, 0);
        ins(&mut p, ALU64_ADD_K, 2, 0, 0, -4);
        ld_map(&mut p, 1, stats);
        ins(&mut p, CALL, 0, 0, 0, 1); // map_lookup_elem
        ins(&mut p, ALU64_MOV_X, 8, 0, 0, 0);
        let j_nostats = p.len();
        ins(&mut p, JEQ_K, 8, 0, 0, 0); // patched → pass
        ins(&mut p, ALU64_MOV_K, 1, 0, 0, 1);
        ins(&mut p, ATOMIC_DW, 8, 1, 0, 0); // calls++
        ins(&mut p, LDX_W, 7, 6, 0, 0); // r7 = skb->len
        let j_nonzero = p.len();
        ins(&mut p, JNE_K, 7, 0, 0, 0); // patched → nonzero
        ins(&mut p, ALU64_MOV_K, 1, 0, 0, 1);
        ins(&mut p, ATOMIC_DW, 8, 1, 16, 0); // zerolen++
        ins(&mut p, ALU64_MOV_K, 0, 0, 0, zero_verdict);
        ins(&mut p, EXIT, 0, 0, 0, 0);
        let l_nonzero = p.len();
        ins(&mut p, ATOMIC_DW, 8, 7, 8, 0); // bytes += len
        ins(&mut p, ALU64_MOV_X, 1, 6, 0, 0);
        ins(&mut p, CALL, 0, 0, 0, 46); // get_socket_cookie
        ins(&mut p, STX_DW, 10, 0, -16, 0);
        ins(&mut p, ALU64_MOV_X, 1, 6, 0, 0);
        ld_map(&mut p, 2, peers);
        ins(&mut p, ALU64_MOV_X, 3, 10, 0, 0);
        ins(&mut p, ALU64_ADD_K, 3, 0, 0, -16);
        ins(&mut p, ALU64_MOV_K, 4, 0, 0, flags); // 0 = egress, 1 = BPF_F_INGRESS
        ins(&mut p, CALL, 0, 0, 0, 72); // sk_redirect_hash
        let j_ok = p.len();
        ins(&mut p, JNE_K, 0, 0, 0, 0); // patched → exit with r0 (SK_PASS = redirected)
        ins(&mut p, ALU64_MOV_K, 1, 0, 0, 1);
        ins(&mut p, ATOMIC_DW, 8, 1, 24, 0); // miss++
        let l_pass = p.len();
        ins(&mut p, ALU64_MOV_K, 0, 0, 0, 1);
        let l_exit = p.len();
        ins(&mut p, EXIT, 0, 0, 0, 0);
        let patch = |p: &mut Vec<u64>, at: usize, to: usize| {
            let off = (to as i64 - at as i64 - 1) as i16 as u16 as u64;
            p[at] = (p[at] & !(0xffff << 16)) | off << 16;
        };
        patch(&mut p, j_nostats, l_pass);
        patch(&mut p, j_nonzero, l_nonzero);
        patch(&mut p, j_ok, l_exit);
        let mut log = vec![0u8; 16 << 10];
        let lic = b"GPL\0";
        let mut a = Attr::new();
        a.u32(0, 14) // BPF_PROG_TYPE_SK_SKB
            .u32(4, p.len() as u32)
            .u64(8, p.as_ptr() as u64)
            .u64(16, lic.as_ptr() as u64)
            .u32(24, 1)
            .u32(28, log.len() as u32)
            .u64(32, log.as_mut_ptr() as u64);
        let r = bpf(5, &mut a);
        if r < 0 {
            let e = io::Error::last_os_error();
            let l = String::from_utf8_lossy(&log);
            let l = l.split('\0').next().unwrap_or("");
            if e.raw_os_error() != Some(libc::EAGAIN) {
                for line in l.lines() {
                    println!("# verifier: {line}");
                }
            }
            return Err(format!(
                "prog_load: {e}: {}",
                l.lines().last().unwrap_or("")
            ));
        }
        Ok(r as i32)
    }

    /// PEERS (no program) + VERDICT (program attached) + stats, as in design rule 2.
    struct Maps {
        stats: i32,
        peers: i32,
        verdict: i32,
    }

    fn setup(zero_verdict: i32, flags: i32) -> Res<(Maps, String)> {
        let stats = map_create(2, 4, 32, 1)?; // ARRAY
        let peers = map_create(18, 8, 4, 64)?; // SOCKHASH
        let verdict = map_create(18, 8, 4, 64)?;
        let prog = load_prog(stats, peers, zero_verdict, flags)?;
        // BPF_PROG_ATTACH (aya < 6.10 path): target_fd, attach_bpf_fd, attach_type=STREAM_VERDICT.
        let r = bpf(
            8,
            Attr::new()
                .u32(0, verdict as u32)
                .u32(4, prog as u32)
                .u32(8, 5),
        );
        if r < 0 {
            return Err(format!("prog_attach: {}", err()));
        }
        // BPF_LINK_CREATE on a second map (aya ≥ 6.10 path): prog_fd, target_fd, attach_type.
        let m2 = map_create(18, 8, 4, 4)?;
        let l = bpf(
            28,
            Attr::new().u32(0, prog as u32).u32(4, m2 as u32).u32(8, 5),
        );
        let link = if l < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINVAL) => "EINVAL".to_string(),
                Some(libc::EPERM) => "EPERM".to_string(),
                Some(libc::EOPNOTSUPP) => "EOPNOTSUPP".to_string(),
                e => format!("errno_{}", e.unwrap_or(0)),
            }
        } else {
            "ok".to_string()
        };
        Ok((
            Maps {
                stats,
                peers,
                verdict,
            },
            link,
        ))
    }

    fn cookie(fd: i32) -> u64 {
        let mut c = 0u64;
        let mut l = 8 as libc::socklen_t;
        // Safety: SO_COOKIE writes a u64 into `c`.
        unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                &mut c as *mut u64 as *mut _,
                &mut l,
            )
        };
        c
    }

    fn so_error(fd: i32) -> i32 {
        let mut e = 0i32;
        let mut l = 4 as libc::socklen_t;
        // Safety: SO_ERROR writes an int into `e`.
        unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut e as *mut i32 as *mut _,
                &mut l,
            )
        };
        e
    }

    fn fionread(fd: i32) -> i32 {
        let mut n = 0i32;
        // Safety: FIONREAD writes an int.
        unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
        n
    }

    fn poll1(fd: i32, events: i16, ms: i32) -> i16 {
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // Safety: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, ms) };
        p.revents
    }

    /// recv(fd, MSG_DONTWAIT [| extra]) → Ok(n) or Err(errno text).
    fn recv_nb(fd: i32, buf: &mut [u8], extra: i32) -> Result<isize, String> {
        // Safety: buf is valid for buf.len() bytes.
        let r = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr() as *mut _,
                buf.len(),
                libc::MSG_DONTWAIT | extra,
            )
        };
        if r < 0 { Err(err()) } else { Ok(r) }
    }

    /// Everything readable on `s` within `ms` of quiet.
    fn drain(s: &mut TcpStream, ms: u64) -> usize {
        s.set_read_timeout(Some(Duration::from_millis(ms))).ok();
        let mut buf = [0u8; 65536];
        let mut n = 0;
        for _ in 0..100_000 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        n
    }

    /// client C → A (accepted by us) ⇄ B (ours) → S (upstream), like the proxy's two sockets.
    struct Conn {
        c: TcpStream,
        a: TcpStream,
        b: TcpStream,
        s: TcpStream,
    }

    fn conn(l: &TcpListener, u: &TcpListener) -> Res<Conn> {
        let c = ctx(
            TcpStream::connect(ctx(l.local_addr(), "addr")?),
            "connect C",
        )?;
        let (a, _) = ctx(l.accept(), "accept A")?;
        let b = ctx(
            TcpStream::connect(ctx(u.local_addr(), "addr")?),
            "connect B",
        )?;
        let (s, _) = ctx(u.accept(), "accept S")?;
        for t in [&c, &a, &b, &s] {
            t.set_write_timeout(Some(IO_TIMEOUT)).ok();
            t.set_nodelay(true).ok();
        }
        Ok(Conn { c, a, b, s })
    }

    fn splice_in(m: &Maps, x: &Conn) -> Res<()> {
        let (fa, fb) = (x.a.as_raw_fd() as u32, x.b.as_raw_fd() as u32);
        let (ka, kb) = (cookie(fa as i32), cookie(fb as i32));
        map_update(m.peers, &ka, &fb).map_err(|e| format!("insert PEERS A: {e}"))?;
        map_update(m.peers, &kb, &fa).map_err(|e| format!("insert PEERS B: {e}"))?;
        map_update(m.verdict, &ka, &fa).map_err(|e| format!("insert VERDICT A: {e}"))?;
        map_update(m.verdict, &kb, &fb).map_err(|e| format!("insert VERDICT B: {e}"))?;
        Ok(())
    }

    fn stats(m: &Maps) -> [u64; 4] {
        let mut v = [0u64; 4];
        map_lookup(m.stats, &0, &mut v);
        v
    }

    fn say(name: &str, r: Res<String>) {
        match r {
            Ok(d) => println!("KM sockmapfix name={name} result=yes detail={}", clean(&d)),
            Err(d) => println!("KM sockmapfix name={name} result=no detail={}", clean(&d)),
        }
    }

    /// Load the verdict program once (no retry): `ok` or the errno, one token.
    pub fn load_once() -> String {
        let r = map_create(2, 4, 32, 1).and_then(|st| {
            let peers = map_create(18, 8, 4, 4)?;
            let r = load_prog_once(st, peers, 0, 0);
            // Safety: closing fds we own.
            unsafe {
                libc::close(st);
                libc::close(peers);
            }
            r
        });
        match r {
            Ok(fd) => {
                unsafe { libc::close(fd) };
                "ok".into()
            }
            Err(e) => e
                .split(':')
                .take(2)
                .collect::<Vec<_>>()
                .join(":")
                .replace(' ', "_"),
        }
    }

    /// The verifier gives up with EAGAIN when the task has a signal (or TIF_NOTIFY_SIGNAL task
    /// work) pending; retry a bounded number of times and say so.
    fn load_prog(stats: i32, peers: i32, zero_verdict: i32, flags: i32) -> Res<i32> {
        let mut last = String::new();
        for i in 0..20 {
            match load_prog_once(stats, peers, zero_verdict, flags) {
                Ok(fd) => {
                    if i > 0 {
                        println!("KM feature name=sk_skb_load_eagain_retries result={i}");
                    }
                    return Ok(fd);
                }
                Err(e) if e.contains("os error 11") => {
                    let st = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                    let pend: Vec<&str> = st
                        .lines()
                        .filter(|l| l.starts_with("SigPnd") || l.starts_with("ShdPnd"))
                        .collect();
                    println!("# prog_load EAGAIN try {i}: {}", pend.join(" "));
                    last = e;
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    pub fn run() {
        let (m, link) = match setup(0, 0) {
            Ok(x) => x,
            Err(e) => {
                println!("KM sockmapfix name=setup result=no detail={}", clean(&e));
                return;
            }
        };
        println!("KM feature name=sockhash_sk_skb_prog_attach result=ok");
        println!(
            "KM feature name=sockmap_link_create result={}",
            link.replace(' ', "_")
        );
        let (Ok(l), Ok(u)) = (
            TcpListener::bind("127.0.0.1:0"),
            TcpListener::bind("127.0.0.1:0"),
        ) else {
            println!("KM sockmapfix name=setup result=no detail=bind");
            return;
        };
        say("relay", relay(&m, &l, &u));
        say("preinsert_kick", preinsert_kick(&m, &l, &u));
        say("fin_drop_clean", fin_drop(&m, &l, &u));
        match setup(1, 0) {
            Ok((mp, _)) => say("fin_pass_recv_eof", fin_pass(&mp, &l, &u)),
            Err(e) => say("fin_pass_recv_eof", Err(e)),
        }
        say("pass_fionread", fionread_check(&m, &l, &u));
        match setup(0, 1) {
            Ok((mi, _)) => say("ingress_fionread", ingress_fionread(&mi, &l, &u)),
            Err(e) => say("ingress_fionread", Err(e)),
        }
        say("halfclose_drain", halfclose_drain(&m, &l, &u));
        println!("KM sockmapfix done");
    }

    /// 1 MiB each way through an inserted pair, counted by the verdict.
    fn relay(m: &Maps, l: &TcpListener, u: &TcpListener) -> Res<String> {
        let mut x = conn(l, u)?;
        splice_in(m, &x)?;
        let n = 1 << 20;
        let mut w = ctx(x.c.try_clone(), "clone")?;
        let t = thread::spawn(move || write_stream(&mut w, 1, n));
        x.s.set_read_timeout(Some(IO_TIMEOUT)).ok();
        verify_stream(&mut x.s, 1, n).map_err(|e| format!("C->S: {e}"))?;
        t.join().map_err(|_| "panic")?.map_err(|e| e.to_string())?;
        let mut w = ctx(x.s.try_clone(), "clone")?;
        let t = thread::spawn(move || write_stream(&mut w, 2, n));
        x.c.set_read_timeout(Some(IO_TIMEOUT)).ok();
        verify_stream(&mut x.c, 2, n).map_err(|e| format!("S->C: {e}"))?;
        t.join().map_err(|_| "panic")?.map_err(|e| e.to_string())?;
        let st = stats(m);
        Ok(format!(
            "1 MiB each way byte-exact; verdict calls={} bytes={} misses={}",
            st[0], st[1], st[3]
        ))
    }

    /// Bytes queued on A before the insert are stuck until a recv "kick" runs the verdict over
    /// them: "bpf, sockmap: TCP data stall on recv before accept" (6.4-rc4).
    fn preinsert_kick(m: &Maps, l: &TcpListener, u: &TcpListener) -> Res<String> {
        let mut x = conn(l, u)?;
        ctx(x.c.write_all(b"hello"), "send")?;
        thread::sleep(Duration::from_millis(100));
        let before = fionread(x.a.as_raw_fd());
        splice_in(m, &x)?;
        let g1 = drain(&mut x.s, 300);
        let mut kb = [0u8; 16];
        let kick = recv_nb(x.a.as_raw_fd(), &mut kb, 0);
        let g2 = drain(&mut x.s, 500);
        let d = format!(
            "FIONREAD(A) before insert={before}; upstream got {g1} before kick; kick recv(A)={kick:?}; got {g2} after kick"
        );
        if g1 + g2 == 5 { Ok(d) } else { Err(d) }
    }

    /// SK_DROP on the zero-length FIN skb (our design): A sees RDHUP, B stays clean, the reverse
    /// direction still works and shutdown(B) gives S its EOF.
    fn fin_drop(m: &Maps, l: &TcpListener, u: &TcpListener) -> Res<String> {
        let mut x = conn(l, u)?;
        splice_in(m, &x)?;
        ctx(x.c.write_all(b"abc"), "send")?;
        let g = drain(&mut x.s, 300);
        let s0 = stats(m);
        ctx(x.c.shutdown(Shutdown::Write), "shutdown C")?;
        let rev = poll1(x.a.as_raw_fd(), libc::POLLRDHUP | libc::POLLIN, 2000);
        let s1 = stats(m);
        let eb = so_error(x.b.as_raw_fd());
        ctx(x.s.write_all(b"xyz"), "send S")?;
        let back = drain(&mut x.c, 500);
        ctx(x.b.shutdown(Shutdown::Write), "shutdown B")?;
        x.s.set_read_timeout(Some(Duration::from_secs(2))).ok();
        let mut e = [0u8; 8];
        let eof = x.s.read(&mut e);
        let d = format!(
            "S got {g}; zero-len skbs {}; A revents=0x{rev:x}; SO_ERROR(B)={eb}; reverse after FIN got {back}; S after shutdown(B): {eof:?}",
            s1[2] - s0[2]
        );
        let ok =
            g == 3 && rev & libc::POLLRDHUP != 0 && eb == 0 && back == 3 && matches!(eof, Ok(0));
        if ok { Ok(d) } else { Err(d) }
    }

    /// SK_PASS on the FIN skb: recv(A) must return 0 ("bpf, sockmap: Handle fin correctly",
    /// 6.4-rc4); without the fix it waits forever.
    fn fin_pass(m: &Maps, l: &TcpListener, u: &TcpListener) -> Res<String> {
        let x = conn(l, u)?;
        splice_in(m, &x)?;
        let c = x.c;
        ctx(c.shutdown(Shutdown::Write), "shutdown C")?;
        let rev = poll1(x.a.as_raw_fd(), libc::POLLIN | libc::POLLRDHUP, 2000);
        let mut b = [0u8; 8];
        let r = recv_nb(x.a.as_raw_fd(), &mut b, 0);
        let d = format!("A revents=0x{rev:x}; recv(A)={r:?}");
        if r == Ok(0) { Ok(d) } else { Err(d) }
    }

    /// FIONREAD on a sockmap socket holding its own SK_PASS'd bytes (informational: our design's
    /// pass mode). A alone in VERDICT (no peer) → every skb is a redirect miss → SK_PASS.
    fn fionread_check(m: &Maps, l: &TcpListener, u: &TcpListener) -> Res<String> {
        let mut x = conn(l, u)?;
        let fa = x.a.as_raw_fd() as u32;
        map_update(m.verdict, &cookie(fa as i32), &fa).map_err(|e| format!("insert: {e}"))?;
        ctx(x.c.write_all(b"0123456789"), "send")?;
        let _ = poll1(x.a.as_raw_fd(), libc::POLLIN, 2000);
        thread::sleep(Duration::from_millis(50));
        let n = fionread(x.a.as_raw_fd());
        let mut b = [0u8; 4];
        let p = recv_nb(x.a.as_raw_fd(), &mut b, libc::MSG_PEEK);
        let r = recv_nb(x.a.as_raw_fd(), &mut b, 0);
        let n2 = fionread(x.a.as_raw_fd());
        let mut rest = [0u8; 16];
        let r2 = recv_nb(x.a.as_raw_fd(), &mut rest, 0);
        let _ = &mut x.b;
        let d = format!(
            "FIONREAD after 10 bytes={n}; peek 4={p:?}; read 4={r:?}; FIONREAD after={n2}; read rest={r2:?}"
        );
        if n == 10 && n2 == 6 && r2 == Ok(6) {
            Ok(d)
        } else {
            Err(d)
        }
    }

    /// Bytes redirected with BPF_F_INGRESS from A into B's receive queue must show in FIONREAD(B)
    /// ("bpf, sockmap: Fix FIONREAD for sockmap", Jiayuan Chen, merged Jan 2026, stable 6.6.128+).
    /// Our engine never redirects to ingress (rule 3); this only tells the kernels apart.
    fn ingress_fionread(m: &Maps, l: &TcpListener, u: &TcpListener) -> Res<String> {
        let mut x = conn(l, u)?;
        splice_in(m, &x)?;
        ctx(x.c.write_all(b"0123456789"), "send")?;
        let _ = poll1(x.b.as_raw_fd(), libc::POLLIN, 2000);
        thread::sleep(Duration::from_millis(100));
        let n = fionread(x.b.as_raw_fd());
        let mut buf = [0u8; 32];
        let r = recv_nb(x.b.as_raw_fd(), &mut buf, 0);
        let _ = &mut x.s;
        let d = format!("10 bytes redirected into B's ingress: FIONREAD(B)={n}; recv(B)={r:?}");
        if n == 10 && r == Ok(10) {
            Ok(d)
        } else {
            Err(d)
        }
    }

    /// 4 MiB C→S, client FIN; wait until B accepted every redirected byte, then shutdown(B):
    /// S must get all 4 MiB then EOF (design rule 9).
    fn halfclose_drain(m: &Maps, l: &TcpListener, u: &TcpListener) -> Res<String> {
        let x = conn(l, u)?;
        splice_in(m, &x)?;
        let n = 4 << 20;
        let s0 = stats(m);
        let mut c = x.c;
        let mut s = x.s;
        s.set_read_timeout(Some(IO_TIMEOUT)).ok();
        let reader = thread::spawn(move || {
            let r = verify_stream(&mut s, 9, n);
            let eof = read_to_eof(&mut s);
            (r, eof)
        });
        ctx(write_stream(&mut c, 9, n), "send")?;
        ctx(c.shutdown(Shutdown::Write), "shutdown C")?;
        let rev = poll1(x.a.as_raw_fd(), libc::POLLRDHUP, 5000);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut redir = 0;
        while Instant::now() < deadline {
            redir = stats(m)[1] - s0[1];
            let mut ti: libc::tcp_info = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            // Safety: TCP_INFO fills at most `len` bytes of `ti`.
            unsafe {
                libc::getsockopt(
                    x.b.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_INFO,
                    &mut ti as *mut _ as *mut _,
                    &mut len,
                )
            };
            let mut outq = 0i32;
            // Safety: SIOCOUTQ writes an int.
            unsafe { libc::ioctl(x.b.as_raw_fd(), libc::TIOCOUTQ, &mut outq) };
            let queued = ti.tcpi_bytes_acked.saturating_sub(1) + outq as u64;
            if redir >= n as u64 && queued >= redir {
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        ctx(x.b.shutdown(Shutdown::Write), "shutdown B")?;
        let (r, eof) = reader.join().map_err(|_| "panic")?;
        let eb = so_error(x.b.as_raw_fd());
        let d = format!(
            "A revents=0x{rev:x}; redirected={redir}; S: {r:?} then {eof:?}; SO_ERROR(B)={eb}"
        );
        if r.is_ok() && matches!(eof, Ok(0)) && eb == 0 {
            Ok(d)
        } else {
            Err(d)
        }
    }
}
