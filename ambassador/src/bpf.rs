//! The loader for the sockmap engine's kernel program (`ambassador-ebpf`).
//!
//! - [`probe`] checks the kernel and privileges, loads the committed object,
//!   creates the maps and attaches the verdict program, or returns the exact
//!   reason it could not (`BPF_PROG_LOAD: EPERM — needs CAP_BPF and
//!   CAP_NET_ADMIN`), which `--mode auto` logs before falling back.
//! - [`Splicer`] owns the loaded program and its maps: insert a connection's
//!   two sockets, read the per-direction counters, set the budget, take a
//!   pair out of the maps again.
//! - A few raw socket helpers the engine needs ([`socket_cookie`],
//!   [`kick_verdict`], [`pause_verdict`], [`poke_sender`], [`consumed`], [`bytes_received`], [`queued_total`], [`so_error`]).
//!
//! Unsafe code here is limited to `getsockopt`/`ioctl`/`recv`/`setsockopt`
//! calls on fds we borrow; each site says why it is sound. The layout of the
//! maps lives in `ambassador-common`, shared with the program.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use ambassador_common::{
    DirCtrl, DirStats, GLOBAL_TRIM, MAP_CTRL, MAP_EVENTS, MAP_PEERS, MAP_STATS, MAP_VERDICT,
    PROG_VERDICT, SEQ_TRACKING, WAKE_NEVER,
};
use aya::maps::{HashMap, MapData, MapError, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfError, EbpfLoader};

mod btf;

/// The committed object, rebuilt by `cargo xtask build-ebpf`. Embedding it
/// means a stable `cargo build` never needs the BPF toolchain.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/ambassador.bpf.o");

/// CAP_PERFMON, or CAP_SYS_ADMIN which implies it: what the verifier asks
/// of a program that calls `bpf_probe_read_kernel`.
fn perfmon_capable() -> bool {
    use caps::{CapSet, Capability, has_cap};
    [Capability::CAP_PERFMON, Capability::CAP_SYS_ADMIN]
        .into_iter()
        .any(|c| has_cap(None, CapSet::Effective, c).unwrap_or(false))
}

/// Oldest kernel with verdict-only sk_skb mode (no stream parser). Whether a
/// kernel also carries the fixes we rely on (the 6.4-rc4 sockmap series for
/// bytes queued before insertion and FIN handling; `docs/kernels.md`) is not
/// read from the version, since distributions backport them (Debian 12's
/// 6.1.192 has them): [`Splicer::self_test`] checks the behaviour itself.
pub const MIN_KERNEL: (u32, u32) = (5, 10);

/// Loaded, attached program plus the four maps (see `ambassador-common`).
pub struct Splicer {
    peers: SockHash<MapData, u64>,
    verdict: SockHash<MapData, u64>,
    stats: HashMap<MapData, u64, DirStats>,
    ctrl: HashMap<MapData, u64, DirCtrl>,
    /// Cookies that just started passing; taken by the engine's watcher.
    events: Option<RingBuf<MapData>>,
    /// Sockets each map holds at most (two per spliced connection).
    capacity: u32,
    /// Whether the program cuts overlapping skbs (see [`Splicer::trims`]).
    trim: Result<(), String>,
    /// Whether it judges the first skb after an insert too (see
    /// [`Splicer::judges_first_skb`]).
    first_skb: Result<(), String>,
    /// Whether the program was loaded reading `copied_seq`.
    judging_first: bool,
    /// Keeps the program and its link to `VERDICT` alive. Dropping it
    /// detaches the program; sockets already inserted keep their verdict.
    _ebpf: Ebpf,
}

/// One socket of a pair being inserted.
#[derive(Clone, Copy, Debug)]
pub struct Sock {
    pub fd: RawFd,
    pub cookie: u64,
}

/// Why inserting a pair failed. Nothing of the pair is left in any map.
#[derive(Debug)]
pub struct InsertError {
    /// `PEERS`, `VERDICT`, `STATS` or `CTRL`.
    pub map: &'static str,
    pub errno: i32,
}

/// How far [`Splicer::insert_pair`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Both sockets are in `VERDICT`: the kernel moves both directions.
    Both,
    /// Only `a` is in `VERDICT` (`b` failed, typically `EOPNOTSUPP` because
    /// its peer sent FIN between the two inserts, so it is CLOSE_WAIT). The
    /// kernel moves a→b; b→a must be copied in userspace, which is safe:
    /// nothing is ever redirected into `a`. The errno is `b`'s failure.
    FirstOnly(i32),
}

impl fmt::Display for InsertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "insert into {}: {}", self.map, errno_name(self.errno))
    }
}

impl std::error::Error for InsertError {}

/// Check the kernel and privileges, then load and attach the program with
/// maps sized for `max_sockets` sockets. `Err` is a one-line reason naming
/// the failing syscall, its errno and what would fix it.
pub fn probe(max_sockets: u32) -> Result<Splicer, String> {
    let release = kernel_release();
    check_kernel(&release)?;
    let failed = |e| format!("kernel {release}: sockmap self-test failed: {e}");
    let mut splicer = Splicer::load(max_sockets, true, None)?;
    splicer.self_test().map_err(failed)?;
    if let Err(why) = splicer.first_skb.clone()
        && splicer.judging_first
    {
        // The read of `copied_seq` is wrong here: load again without it, so
        // the program trusts the first skb (as it would without BTF).
        drop(splicer);
        splicer = Splicer::load(max_sockets, false, None)?;
        splicer.self_test().map_err(failed)?;
        splicer.first_skb = Err(why);
    }
    Ok(splicer)
}

impl Splicer {
    /// Load the embedded object, create the maps (`max_sockets` entries
    /// each), load the verdict program and attach it to `VERDICT`. With
    /// `judge_first`, the program also reads the socket's `copied_seq` at
    /// the first skb after an insert, at offsets from the kernel's BTF (or
    /// at `at`: a test's wrong ones).
    fn load(max_sockets: u32, judge_first: bool, at: Option<(u32, u32)>) -> Result<Self, String> {
        // Cutting overlapping skbs reads the skb's sequence numbers with
        // `bpf_probe_read_kernel`, which the verifier allows only with
        // CAP_PERFMON (or CAP_SYS_ADMIN). Without it the program is loaded
        // with the cut turned off, and the engine says so.
        let trim = if perfmon_capable() {
            Ok(())
        } else {
            Err("needs CAP_PERFMON or CAP_SYS_ADMIN at start-up".to_string())
        };
        // Where the program finds a socket's `copied_seq`, so that it judges
        // the first skb after an insert too (0: it trusts that one).
        let offsets = match &trim {
            Err(why) => Err(why.clone()),
            Ok(()) => at
                .or_else(|| {
                    btf::offset_of("sk_buff", "sk").zip(btf::offset_of("tcp_sock", "copied_seq"))
                })
                .ok_or_else(|| {
                    "no sk_buff.sk or tcp_sock.copied_seq in /sys/kernel/btf/vmlinux".to_string()
                }),
        };
        let judging_first = judge_first && offsets.is_ok();
        let (skb_sk, copied) = match offsets {
            Ok(o) if judge_first => o,
            _ => (0, 0),
        };
        let first_skb = offsets.map(|_| ());
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_TRIM, &u8::from(trim.is_ok()), true)
            .override_global("SKB_SK", &skb_sk, true)
            .override_global("TCP_COPIED_SEQ", &copied, true)
            .map_max_entries(MAP_PEERS, max_sockets)
            .map_max_entries(MAP_VERDICT, max_sockets)
            .map_max_entries(MAP_STATS, max_sockets)
            .map_max_entries(MAP_CTRL, max_sockets)
            .load(OBJECT)
            .map_err(|e| reason_for_load(&e))?;
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| format!("object has no map {name} (stale ambassador.bpf.o?)"))
        };
        let peers: SockHash<_, u64> = take(&mut ebpf, MAP_PEERS)?.try_into().map_err(fmt_err)?;
        let verdict: SockHash<_, u64> =
            take(&mut ebpf, MAP_VERDICT)?.try_into().map_err(fmt_err)?;
        let stats: HashMap<_, u64, DirStats> =
            take(&mut ebpf, MAP_STATS)?.try_into().map_err(fmt_err)?;
        let ctrl: HashMap<_, u64, DirCtrl> =
            take(&mut ebpf, MAP_CTRL)?.try_into().map_err(fmt_err)?;
        let events: RingBuf<_> = take(&mut ebpf, MAP_EVENTS)?.try_into().map_err(fmt_err)?;
        let prog: &mut SkSkb = ebpf
            .program_mut(PROG_VERDICT)
            .ok_or("object has no program verdict")?
            .try_into()
            .map_err(fmt_err)?;
        prog.load().map_err(|e| reason("BPF_PROG_LOAD", &e))?;
        let map_fd = verdict.fd().try_clone().map_err(|e| reason("dup", &e))?;
        // aya attaches with a BPF link from 6.10 on, with the older
        // prog-attach call below that: name the one that failed.
        let attach_call = if kernel_at_least(&kernel_release(), (6, 10)) {
            "BPF_LINK_CREATE"
        } else {
            "BPF_PROG_ATTACH"
        };
        prog.attach(&map_fd).map_err(|e| reason(attach_call, &e))?;
        Ok(Self {
            peers,
            verdict,
            stats,
            ctrl,
            events: Some(events),
            capacity: max_sockets,
            trim,
            first_skb,
            judging_first,
            _ebpf: ebpf,
        })
    }

    /// The `EVENTS` ring buffer (once): each record is the `u64` cookie of a
    /// socket whose verdict just switched from redirecting to passing.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Sockets each map can hold (two per connection).
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// `Ok` when the program cuts skbs that overlap bytes already handed on
    /// (proved by the self-test), else why not. Without the cut such an skb
    /// is still caught by the engine's conservation check (a reset).
    pub fn trims(&self) -> Result<(), &str> {
        self.trim.as_ref().map(|_| ()).map_err(String::as_str)
    }

    /// `Ok` when the program also judges the first skb after an insert
    /// against the socket's `copied_seq` (proved by the self-test), so bytes
    /// userspace read from it before the insert are cut, else why not.
    /// Without it such a repeat is caught by the engine's conservation
    /// check (a reset), after the bytes reached the peer.
    pub fn judges_first_skb(&self) -> Result<(), &str> {
        self.trims()?;
        self.first_skb.as_ref().map(|_| ()).map_err(String::as_str)
    }

    /// Splice `a` and `b`: counters and budget first, then `PEERS` (both
    /// redirect targets exist before any verdict), then `VERDICT` (verdicts
    /// start). Both sockets must be ESTABLISHED. On error everything already
    /// inserted is removed again. The caller must [`kick`] both sockets
    /// afterwards so bytes queued before the insert are processed.
    ///
    /// Once `a` is in `VERDICT` its bytes may already have been redirected,
    /// so a failure of the last step is not undone: see [`Inserted`].
    pub fn insert_pair(&mut self, a: Sock, b: Sock, limit: u64) -> Result<Inserted, InsertError> {
        let ctrl = DirCtrl {
            limit,
            forwarded: 0,
            wake: WAKE_NEVER,
        };
        let mut step = 0;
        let r: Result<(), InsertError> = (|| {
            for s in [a, b] {
                self.stats
                    .insert(s.cookie, DirStats::default(), 0)
                    .map_err(|e| ie(MAP_STATS, e))?;
                self.ctrl
                    .insert(s.cookie, ctrl, 0)
                    .map_err(|e| ie(MAP_CTRL, e))?;
            }
            step = 1;
            self.peers
                .insert(a.cookie, b.fd, 0)
                .map_err(|e| ie(MAP_PEERS, e))?;
            step = 2;
            self.peers
                .insert(b.cookie, a.fd, 0)
                .map_err(|e| ie(MAP_PEERS, e))?;
            step = 3;
            self.verdict
                .insert(a.cookie, a.fd, 0)
                .map_err(|e| ie(MAP_VERDICT, e))?;
            Ok(())
        })();
        if let Err(e) = r {
            // Undo in reverse. Removing a socket from every sockmap drops its
            // psock and restores the plain TCP callbacks, so the pair can go
            // on in userspace.
            if step >= 3 {
                let _ = self.peers.remove(&b.cookie);
            }
            if step >= 2 {
                let _ = self.peers.remove(&a.cookie);
            }
            self.forget(a.cookie);
            self.forget(b.cookie);
            return Err(e);
        }
        match self.verdict.insert(b.cookie, b.fd, 0) {
            Ok(()) => Ok(Inserted::Both),
            Err(e) => Ok(Inserted::FirstOnly(ie(MAP_VERDICT, e).errno)),
        }
    }

    /// Prove on a throw-away loopback connection pair that this kernel
    /// splices the way the engine relies on, instead of trusting a version
    /// number:
    /// 1. a byte queued before the insert is forwarded after the kick (the
    ///    6.4 fix "bpf, sockmap: TCP data stall on recv before accept"),
    ///    and, when the program reads `copied_seq`, the byte userspace read
    ///    from the same skb before the insert is cut, not forwarded again;
    /// 2. after a FIN on one side (a zero-length skb the program drops) the
    ///    peer socket carries no error and the other direction still flows;
    /// 3. a pair that leaves the maps is a pair of plain, readable TCP
    ///    sockets again (the engine's way out of the kernel).
    ///
    /// Every wait is on a condition (poll), bounded by 3 s.
    pub fn self_test(&mut self) -> Result<(), String> {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::time::Duration;
        let io = |what: &'static str| move |e: io::Error| format!("{what}: {e}");
        let l = TcpListener::bind("127.0.0.1:0").map_err(io("bind"))?;
        let addr = l.local_addr().map_err(io("bind"))?;
        // app <-> a (the proxy's client side), b <-> db (its upstream side).
        let mut app = TcpStream::connect(addr).map_err(io("connect"))?;
        let (mut a, _) = l.accept().map_err(io("accept"))?;
        let mut b = TcpStream::connect(addr).map_err(io("connect"))?;
        let (mut db, _) = l.accept().map_err(io("accept"))?;
        for s in [&app, &db, &a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(3)))
                .map_err(io("timeout"))?;
        }
        // Reading `copied_seq` on: one skb "xk" whose "x" userspace reads
        // before the insert, so the program must cut it.
        let first = self.judging_first;
        app.write_all(if first { b"xk" } else { b"k" })
            .map_err(io("write"))?;
        if !wait_for(&a, libc::POLLIN) {
            return Err("a byte written on loopback never arrived".into());
        }
        if first {
            let mut x = [0u8; 1];
            a.read_exact(&mut x).map_err(io("read"))?;
        }
        let sa = Sock {
            fd: a.as_raw_fd(),
            cookie: socket_cookie(&a).map_err(io("SO_COOKIE"))?,
        };
        let sb = Sock {
            fd: b.as_raw_fd(),
            cookie: socket_cookie(&b).map_err(io("SO_COOKIE"))?,
        };
        let result = (|| {
            match self.insert_pair(sa, sb, 1 << 20) {
                Ok(Inserted::Both) => {}
                Ok(Inserted::FirstOnly(e)) => return Err(format!("insert: {}", errno_name(e))),
                Err(e) => return Err(format!("insert: {e}")),
            }
            kick_verdict(&a).map_err(io("kick"))?;
            kick_verdict(&b).map_err(io("kick"))?;
            if first {
                // The kick ran the verdict under the socket lock: its
                // counters are final.
                let st = self.stats(sa.cookie).map_err(io("STATS"))?;
                if st.trimmed_bytes != 1 || st.seq_anomalies != 0 {
                    self.first_skb = Err(format!(
                        "the byte read before the insert was not cut ({} cut, {} anomalies): \
                         tcp_sock.copied_seq misread from the kernel's BTF?",
                        st.trimmed_bytes, st.seq_anomalies
                    ));
                    // `probe` loads the program again without the read and
                    // runs the whole test on that.
                    return Ok(());
                }
            }
            let mut got = [0u8; 1];
            if db.read_exact(&mut got).is_err() || &got != b"k" {
                return Err(
                    "a byte queued before the insert was not forwarded after the \
                            kick (needs the 6.4 fix \"bpf, sockmap: TCP data stall on recv \
                            before accept\")"
                        .into(),
                );
            }
            if self.trim.is_ok() {
                // The byte went through `overlap()`: its sequence numbers
                // must have been readable and consistent.
                let st = self.stats(sa.cookie).map_err(io("STATS"))?;
                if st.seq_state != SEQ_TRACKING {
                    self.trim = Err(format!(
                        "this kernel's skb layout is not the one the program reads \
                         (seq_state {})",
                        st.seq_state
                    ));
                }
            }
            app.shutdown(Shutdown::Write).map_err(io("shutdown"))?;
            // The FIN reaches `a`; then the reverse direction must still work.
            if !wait_for(&a, libc::POLLRDHUP) {
                return Err("a FIN never reached the spliced socket".into());
            }
            db.write_all(b"r").map_err(io("write"))?;
            if app.read_exact(&mut got).is_err() || &got != b"r" {
                return Err("the reverse direction stopped after a FIN".into());
            }
            for (name, s) in [("client", so_error(&a)), ("upstream", so_error(&b))] {
                if s != 0 {
                    return Err(format!(
                        "a FIN left an error on the {name} socket ({})",
                        io::Error::from_raw_os_error(s)
                    ));
                }
            }
            // Leave: out of VERDICT, lock barrier, out of PEERS.
            self.leave(sa.cookie).map_err(io("leave"))?;
            self.leave(sb.cookie).map_err(io("leave"))?;
            bytes_received(&a).map_err(io("TCP_INFO"))?;
            bytes_received(&b).map_err(io("TCP_INFO"))?;
            self.unlink(sa.cookie).map_err(io("unlink"))?;
            self.unlink(sb.cookie).map_err(io("unlink"))?;
            db.write_all(b"y").map_err(io("write"))?;
            let plain = b.read_exact(&mut got).is_ok() && &got == b"y";
            let eof = a.read(&mut got).map_err(io("read")).ok() == Some(0);
            if !plain || !eof {
                return Err("a socket that left the sockmaps is not readable again".into());
            }
            Ok(())
        })();
        self.forget(sa.cookie);
        self.forget(sb.cookie);
        result
    }

    /// Take a socket out of `VERDICT`: no verdict runs for its received
    /// bytes any more. It stays in `PEERS` (as the destination of the other
    /// direction) until [`Splicer::unlink`]; meanwhile its receive path is
    /// not usable (reads return `EAGAIN` while bytes wait), so a connection
    /// leaves the maps as a whole.
    pub fn leave(&mut self, cookie: u64) -> io::Result<()> {
        match self.verdict.remove(&cookie).map_err(map_io) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r,
        }
    }

    /// Take the socket keyed `cookie`'s peer out of `PEERS`. Once both
    /// entries of a pair are gone the kernel drops both psocks and the
    /// sockets are plain TCP sockets again. Only call it when every byte
    /// redirected into either socket has left its psock queue (the drop
    /// discards what is still queued).
    pub fn unlink(&mut self, cookie: u64) -> io::Result<()> {
        self.peers.remove(&cookie).map_err(map_io)
    }

    /// The kernel's counters for bytes received on `cookie`'s socket.
    pub fn stats(&self, cookie: u64) -> io::Result<DirStats> {
        self.stats.get(&cookie, 0).map_err(map_io)
    }

    /// Write the controls for bytes received on `cookie`'s socket: the
    /// budget `limit`, and `wake`, the redirected count whose crossing
    /// pushes the cookie to `EVENTS` ([`WAKE_NEVER`]: none). `forwarded`
    /// stays 0: this engine never copies passed bytes. The update replaces
    /// the whole value at once; a verdict running meanwhile sees the old
    /// value or the new one.
    pub fn set_ctrl(&mut self, cookie: u64, limit: u64, wake: u64) -> io::Result<()> {
        let ctrl = DirCtrl {
            limit,
            forwarded: 0,
            wake,
        };
        self.ctrl.insert(cookie, ctrl, 0).map_err(map_io)
    }

    /// Drop a closed socket's counters and controls. (Its `PEERS` and
    /// `VERDICT` entries are removed by the kernel when the socket closes:
    /// never delete those while the peer's psock may still hold bytes.)
    pub fn forget(&mut self, cookie: u64) {
        let _ = self.stats.remove(&cookie);
        let _ = self.ctrl.remove(&cookie);
    }

    /// Entries currently in (`PEERS`, `VERDICT`, `STATS`, `CTRL`), counted
    /// by walking the keys (a sockhash value cannot be read back with aya's
    /// 4-byte value, but its keys can). For leak checks; O(entries).
    pub fn entries(&self) -> (usize, usize, usize, usize) {
        (
            self.peers.keys().filter(Result::is_ok).count(),
            self.verdict.keys().filter(Result::is_ok).count(),
            self.stats.keys().filter(Result::is_ok).count(),
            self.ctrl.keys().filter(Result::is_ok).count(),
        )
    }
}

fn ie(map: &'static str, e: MapError) -> InsertError {
    let errno = find_io(&e).and_then(io::Error::raw_os_error).unwrap_or(0);
    InsertError { map, errno }
}

fn map_io(e: MapError) -> io::Error {
    match find_io(&e).and_then(io::Error::raw_os_error) {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::other(e.to_string()),
    }
}

fn fmt_err(e: impl fmt::Display) -> String {
    e.to_string()
}

/// The first `io::Error` in an error's source chain.
fn find_io<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

fn reason_for_load(e: &EbpfError) -> String {
    // Creating the maps is the first privileged step of `EbpfLoader::load`.
    let call = match e {
        EbpfError::MapError(_) => "BPF_MAP_CREATE",
        EbpfError::ProgramError(_) => "BPF_PROG_LOAD",
        _ => "bpf",
    };
    reason(call, e)
}

/// `SYSCALL: ERRNO — what fixes it`, e.g.
/// `BPF_PROG_LOAD: EPERM — needs CAP_BPF and CAP_NET_ADMIN`.
fn reason(call: &str, e: &(dyn std::error::Error + 'static)) -> String {
    let Some(errno) = find_io(e).and_then(io::Error::raw_os_error) else {
        return format!("{call}: {e}");
    };
    let hint = match errno {
        libc::EPERM | libc::EACCES if !has_bpf_caps() => {
            "needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN)".to_string()
        }
        libc::EPERM | libc::EACCES => {
            "denied although CAP_BPF and CAP_NET_ADMIN are present (seccomp, LSM or \
             kernel.unprivileged_bpf_disabled in a user namespace?)"
                .to_string()
        }
        libc::EINVAL => "kernel rejected it (CONFIG_BPF_SYSCALL / CONFIG_NET_SOCK_MSG off?)".into(),
        libc::ENOMEM => "out of memory (memcg limit?)".into(),
        libc::ENOSYS => "bpf() not available (CONFIG_BPF_SYSCALL off?)".into(),
        _ => e.to_string(),
    };
    format!("{call}: {} — {hint}", errno_name(errno))
}

/// `EPERM`, `E2BIG`, ... (falls back to the number).
pub fn errno_name(errno: i32) -> String {
    let s = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::E2BIG => "E2BIG",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EBADF => "EBADF",
        _ => return format!("errno {errno}"),
    };
    s.to_string()
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `major.minor` of a release string such as `6.1.0-56-amd64`.
fn kernel_version(release: &str) -> (u32, u32) {
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let major: u32 = nums.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor: u32 = nums.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (major, minor)
}

fn kernel_at_least(release: &str, v: (u32, u32)) -> bool {
    kernel_version(release) >= v
}

/// Refuse kernels without verdict-only mode. (Newer fixes are checked by
/// behaviour, in [`Splicer::self_test`].)
pub fn check_kernel(release: &str) -> Result<(), String> {
    if !kernel_at_least(release, MIN_KERNEL) {
        return Err(format!(
            "kernel {release}: no verdict-only sk_skb mode (needs Linux {}.{} or later)",
            MIN_KERNEL.0, MIN_KERNEL.1
        ));
    }
    Ok(())
}

/// Does `CapEff` have CAP_SYS_ADMIN, or both CAP_BPF and CAP_NET_ADMIN?
pub fn has_bpf_caps() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let bit = |n: u32| eff & (1u64 << n) != 0;
    bit(21) || (bit(39) && bit(12))
}

/// `SO_COOKIE`: the socket's never-reused 64-bit id, our map key.
pub fn socket_cookie(fd: &impl AsFd) -> io::Result<u64> {
    socket2::SockRef::from(fd).cookie()
}

/// Is the socket still ESTABLISHED? A socket whose peer already sent FIN
/// (CLOSE_WAIT) cannot be inserted into a sockmap (EOPNOTSUPP).
pub fn established(fd: &impl AsRawFd) -> bool {
    // TCP_ESTABLISHED is 1 (include/net/tcp_states.h); libc has no name for it.
    tcp_info(fd).is_ok_and(|ti| ti.tcpi_state == 1)
}

/// `TCP_INFO` of a socket.
pub fn tcp_info(fd: &impl AsRawFd) -> io::Result<libc::tcp_info> {
    // Safety: a zeroed `tcp_info` is a valid value; the kernel writes at
    // most `len` bytes into it.
    let mut ti: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // Safety: live fd, valid out pointers.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut ti).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ti)
}

/// Bytes TCP has received in order on this socket since it was created
/// (`tcpi_bytes_received`: each byte once, however often it was sent; a
/// received FIN counts 1). Reading it takes the socket lock.
pub fn bytes_received(fd: &impl AsRawFd) -> io::Result<u64> {
    Ok(tcp_info(fd)?.tcpi_bytes_received)
}

/// `SIOCINQ`: bytes received but not yet read (only meaningful while the
/// socket is in no sockmap).
pub fn inq(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // Safety: SIOCINQ (= FIONREAD) writes one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

/// The "kick" for a socket in `VERDICT`: run the verdict over bytes that
/// are already queued on it (bytes that arrived before the insert would
/// otherwise wait for the next arrival). `setsockopt(SO_RCVLOWAT, 1)` (the
/// default value) makes TCP check, under the socket lock, whether it must
/// signal readable data, which calls the psock's `data_ready` and so the
/// verdict. It must not be a `recv()`: a read that runs the verdict itself
/// writes back the `copied_seq` it saw before the verdict consumed those
/// bytes (`tcp_bpf_recvmsg_parser`), and the socket is unreadable once it
/// leaves the maps. When it returns, a verdict that was running in softirq
/// for this socket has finished too.
pub fn kick_verdict(fd: &impl AsRawFd) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)
}

/// Hold the verdict back before a socket leaves `VERDICT`. Taking a socket
/// out of a sockmap is not serialised with its receive path: the kernel
/// clears the psock's verdict program (`sk_psock_stop_verdict`) while a
/// `data_ready` on another CPU may be between unlinking an skb from the
/// receive queue and reading that program, and an skb that finds no
/// program is dropped, its bytes consumed (`sk_psock_verdict_recv`,
/// `__SK_DROP`). `SO_RCVLOWAT` at its maximum (the kernel caps it at half
/// of `tcp_rmem[2]`) makes `tcp_data_ready()` skip `data_ready` until that
/// much is queued, and the setsockopt takes the socket lock, so a verdict
/// already running has finished when it returns. Bytes arriving from then
/// on wait in the plain receive queue. (A window that is about to close
/// still wakes `data_ready`; [`consumed`] tells afterwards, exactly,
/// whether any skb went missing.) Undo with [`kick_verdict`] (value 1).
pub fn pause_verdict(fd: &impl AsRawFd) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, libc::c_int::MAX)
}

/// Make a psock retry sending what it holds for this socket. Its worker
/// gives up with `EAGAIN` when the socket is not writable
/// (`sk_psock_handle_skb`: `!sock_writeable()`, without calling
/// `sendmsg`, so TCP is not asked to report space later) and runs again
/// only on the next redirect or `write_space` callback: once the source
/// stops (the connection leaves `VERDICT`, or waits for an answer) the
/// bytes can stay queued for good. Setting `TCP_NOTSENT_LOWAT` calls
/// `sk_write_space()`; 0 restores the default, so nothing else changes.
pub fn poke_sender(fd: &impl AsRawFd) -> io::Result<()> {
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, 0)
}

/// A stalled destination (`engine/sockmap/rest.rs`): `TCP_NOTSENT_LOWAT` 1,
/// so the socket polls writable only once it has sent every byte it holds;
/// its `tcp_poll` then sets `SOCK_NOSPACE`, and the ACKs that free it call
/// `sk_write_space()`, which runs the psock worker and wakes `EPOLLOUT`.
/// Setting it pokes the psock too (see [`poke_sender`], which undoes it).
pub fn wake_when_sent(fd: &impl AsRawFd) -> io::Result<()> {
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, 1)
}

fn set_int(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // Safety: live fd, a valid int option value.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes consumed from this socket's receive stream since it was created
/// (`copied_seq`, less the FIN): `tcpi_bytes_received` − `SIOCINQ` − 1 once
/// a FIN arrived. Consumed means read by userspace or taken by a verdict,
/// so after a connection left the maps, `consumed` = read before the
/// insert + redirected, exactly, or an skb was lost. Only meaningful on a
/// socket in no sockmap (a psock answers `SIOCINQ` itself). The three
/// values come from separate calls, so they are read until `bytes_received`
/// and the FIN are the same before and after `SIOCINQ` (nothing reads the
/// socket meanwhile, so `copied_seq` stands still).
pub fn consumed(fd: &impl AsRawFd) -> io::Result<u64> {
    let fin = |fd: &dyn AsRawFd| {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // Safety: one valid pollfd, no wait.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 1 && p.revents & libc::POLLRDHUP != 0
    };
    for _ in 0..1000 {
        let f1 = fin(fd);
        let r1 = bytes_received(fd)?;
        let q = inq(fd)?;
        let r2 = bytes_received(fd)?;
        let f2 = fin(fd);
        if r1 == r2 && f1 == f2 {
            return Ok(r1.saturating_sub(q + u64::from(f1)));
        }
        std::thread::yield_now();
    }
    Err(io::Error::other(
        "receive queue kept moving while read (1000 tries)",
    ))
}

/// Bytes this socket has put into its send queue so far, as
/// `tcpi_bytes_acked + SIOCOUTQ` (= `write_seq - ISN`, plus 1 for the SYN on
/// the connecting side: use deltas). The two come from two system calls; an
/// ACK between them would make the sum under-count, so it is read until
/// `tcpi_bytes_acked` is the same before and after `SIOCOUTQ` (both move
/// together with `snd_una`): the result is exact.
pub fn queued_total(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut acked = tcp_info(fd)?.tcpi_bytes_acked;
    for _ in 0..1000 {
        let mut outq: libc::c_int = 0;
        // Safety: SIOCOUTQ (= TIOCOUTQ) writes one int.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut outq) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let again = tcp_info(fd)?.tcpi_bytes_acked;
        if again == acked {
            return Ok(acked + outq.max(0) as u64);
        }
        acked = again;
    }
    Err(io::Error::other(
        "send queue kept moving while read (1000 tries)",
    ))
}

/// Wait (at most 3 s) until `fd` reports `events` in `poll(2)`.
fn wait_for(fd: &impl AsRawFd, events: libc::c_short) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // Safety: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, 3000) };
    n == 1 && p.revents & events != 0
}

/// `SO_ERROR` (0 = none, also when it cannot be read).
pub fn so_error(fd: &impl AsFd) -> i32 {
    match socket2::SockRef::from(fd).take_error() {
        Ok(Some(e)) => e.raw_os_error().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_gate() {
        assert!(check_kernel("6.18.44-fc").is_ok());
        assert!(check_kernel("6.1.0-56-amd64").is_ok());
        assert!(check_kernel("5.10.0").is_ok());
        assert!(
            check_kernel("5.4.0")
                .unwrap_err()
                .contains("needs Linux 5.10")
        );
        assert!(kernel_at_least("6.12.117+deb12-amd64", (6, 10)));
        assert!(!kernel_at_least("6.1.0-56-amd64", (6, 10)));
    }

    /// The self-test proves the `copied_seq` read, so a wrong offset turns
    /// the first-skb judgement off instead of cutting at a wrong place.
    #[test]
    fn a_wrong_copied_seq_offset_fails_the_self_test() {
        if !has_bpf_caps() || !perfmon_capable() {
            eprintln!("skipped: needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON");
            return;
        }
        let (Some(sk), Some(copied)) = (
            btf::offset_of("sk_buff", "sk"),
            btf::offset_of("tcp_sock", "copied_seq"),
        ) else {
            eprintln!("skipped: no kernel BTF");
            return;
        };
        let mut right = Splicer::load(8, true, Some((sk, copied))).unwrap();
        right.self_test().unwrap();
        assert_eq!(right.judges_first_skb(), Ok(()));
        drop(right);
        // The next member (`rcv_wup` or whatever this kernel has there)
        // never holds where the unread bytes start.
        let mut wrong = Splicer::load(8, true, Some((sk, copied + 4))).unwrap();
        wrong.self_test().unwrap();
        let why = wrong.judges_first_skb().unwrap_err();
        assert!(why.contains("not cut"), "{why}");
        // What the engine gets: the program loaded again, trusting it.
        let p = probe(8).unwrap();
        assert_eq!(p.judges_first_skb(), Ok(()));
    }
}
