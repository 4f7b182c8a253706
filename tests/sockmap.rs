//! The sockmap engine on the real kernel: byte-exact splicing, the edges of
//! a connection's life (speak-first, half-close, reset), backpressure,
//! leaks, a full map, and the fallback when BPF is not allowed.
//!
//! Most tests drive `engine::sockmap::relay` in-process through a small
//! accept loop (the same hand-over the server does) so they can look at the
//! maps, the kernel counters and our own fd table; the last ones run the
//! binary. Needs root (CAP_BPF + CAP_NET_ADMIN), like CI.

use ambassador::config::{Mode, Settings, SplicePolicy};
use ambassador::engine::Conn;
use ambassador::engine::sockmap::{self, Sockmap};
use ambassador::metrics::ForwardStats;
use std::cell::Cell;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- helpers

use ambassador_test_support::netns::private_netns;
use ambassador_test_support::stream::{Stream as Prng, recv_stream, send_stream};
use ambassador_test_support::{
    free_port, poll, poll_async, stat as stat_in, stats_line, until, wait_until,
};

fn settings(idle: Option<Duration>) -> Settings {
    Settings {
        forwards: vec![],
        mode: Mode::Sockmap,
        splice: SplicePolicy::Always,
        nodelay: true,
        connect_timeout: Duration::from_secs(5),
        idle_timeout: idle,
        max_conns: 0,
        drain_timeout: Duration::from_secs(5),
        workers: ambassador::config::Workers::Count(1),
    }
}

/// `SOCKMAP_TEST_POLICY=never` runs a scenario through the userspace path,
/// for comparisons while developing.
fn test_policy() -> SplicePolicy {
    match std::env::var("SOCKMAP_TEST_POLICY").as_deref() {
        Ok("never") => SplicePolicy::Never,
        _ => SplicePolicy::Always,
    }
}

/// Open fds of this process that are the proxy's connection sockets: the
/// accepted side (local port `listen`, not the listener itself) or the
/// connected side (peer `upstream`). Counted by socket inode against
/// /proc/net/tcp, so the fds of tests running in parallel in this process
/// (other ports) never count. The table is the calling thread's (the
/// proxy's runtime runs on the test's thread, which may be in a network
/// namespace of its own: `/proc/<pid>/net` is the main thread's).
fn proxy_fds(listen: u16, upstream: SocketAddr) -> usize {
    fds_in(
        std::process::id(),
        "/proc/thread-self/net",
        listen,
        upstream,
    )
}

/// [`proxy_fds`] of process `pid` (IPv4 and IPv6 sockets).
fn fds_of(pid: u32, listen: u16, upstream: SocketAddr) -> usize {
    fds_in(pid, &format!("/proc/{pid}/net"), listen, upstream)
}

/// Fds of process `pid` that are sockets listed in the tables under `net`.
fn fds_in(pid: u32, net: &str, listen: u16, upstream: SocketAddr) -> usize {
    let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap_or(""), 16).ok();
    let mut ours = std::collections::HashSet::new();
    for table in ["tcp", "tcp6"] {
        let tcp = std::fs::read_to_string(format!("{net}/{table}")).unwrap_or_default();
        for l in tcp.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote, state, inode) = (port(f[1]), port(f[2]), f[3], f[9]);
            if (local == Some(listen) && state != "0A") || remote == Some(upstream.port()) {
                ours.insert(format!("socket:[{inode}]"));
            }
        }
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| ours.contains(t.to_string_lossy().as_ref()))
        .count()
}

/// What the in-process proxy saw, after every connection ended.
#[derive(Debug)]
#[allow(dead_code)] // some fields are only printed
struct Report {
    spliced_to_upstream: u64,
    spliced_to_client: u64,
    copied_to_upstream: u64,
    copied_to_client: u64,
    fallbacks: u64,
    relay_errors: u64,
    conns: u64,
    /// Directions the adaptive policy moved to userspace copying.
    demoted: u64,
    /// Connections whose upstream FIN raced the insert (copied that way).
    half_spliced: u64,
    /// Connections the integrity check reset.
    integrity_resets: u64,
    /// Repeated bytes the program cut (partly old retransmissions).
    trimmed: u64,
    /// (PEERS, VERDICT, STATS, CTRL) entries left.
    entries: (usize, usize, usize, usize),
    fds_leaked: isize,
}

/// Run an in-process sockmap proxy in front of `upstream` while `scenario`
/// (given the proxy's address) runs on its own thread; then wait for every
/// connection to end and report.
/// The engine in-process, for `capacity` connections (the other knobs from
/// the environment, as in the binary, then as `tune` sets them).
fn sockmap_engine(
    policy: SplicePolicy,
    capacity: u32,
    leave_after: Option<u64>,
    tune: impl FnOnce(&mut sockmap::Tuning),
) -> Sockmap {
    let mut tuning = sockmap::Tuning {
        capacity,
        ..sockmap::Tuning::from_env().expect("AMBASSADOR_SOCKMAP_* parse")
    };
    tune(&mut tuning);
    Sockmap::with_tuning(policy, tuning, leave_after).expect("sockmap loads")
}

fn with_proxy<R: Send + 'static>(
    capacity: u32,
    idle: Option<Duration>,
    upstream: SocketAddr,
    scenario: impl FnOnce(SocketAddr) -> R + Send + 'static,
) -> (R, Report) {
    with_proxy_policy(test_policy(), None, capacity, idle, upstream, scenario)
}

/// [`with_proxy`] with a splice policy, and (`leave_after`) every spliced
/// connection leaving the kernel once it redirected that many bytes.
fn with_proxy_policy<R: Send + 'static>(
    policy: SplicePolicy,
    leave_after: Option<u64>,
    capacity: u32,
    idle: Option<Duration>,
    upstream: SocketAddr,
    scenario: impl FnOnce(SocketAddr) -> R + Send + 'static,
) -> (R, Report) {
    with_proxy_tuned(
        policy,
        leave_after,
        capacity,
        |_| {},
        idle,
        upstream,
        scenario,
    )
}

/// [`with_proxy_policy`] with the engine's knobs set by `tune`.
fn with_proxy_tuned<R: Send + 'static>(
    policy: SplicePolicy,
    leave_after: Option<u64>,
    capacity: u32,
    tune: impl FnOnce(&mut sockmap::Tuning) + 'static,
    idle: Option<Duration>,
    upstream: SocketAddr,
    scenario: impl FnOnce(SocketAddr) -> R + Send + 'static,
) -> (R, Report) {
    // `RUST_LOG=debug` shows the engine's own log lines.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let sm = Rc::new(sockmap_engine(policy, capacity, leave_after, tune));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let th = thread::spawn(move || {
            let r = scenario(addr);
            let _ = tx.send(());
            r
        });
        let stats = Arc::new(ForwardStats::default());
        let settings = std::sync::Arc::new(settings(idle));
        let live = Rc::new(Cell::new(0usize));
        let errors = Rc::new(Cell::new(0u64));
        let mut id = 0;
        loop {
            tokio::select! {
                _ = &mut rx => break,
                acc = listener.accept() => {
                    let (c, caddr) = acc.unwrap();
                    id += 1;
                    let (sm, stats, settings, live, errors) =
                        (sm.clone(), stats.clone(), settings.clone(), live.clone(), errors.clone());
                    live.set(live.get() + 1);
                    tokio::task::spawn_local(async move {
                        let up = tokio::net::TcpStream::connect(upstream).await.unwrap();
                        c.set_nodelay(true).unwrap();
                        up.set_nodelay(true).unwrap();
                        let conn = Conn {
                            id,
                            forward: "test".into(),
                            client: c.into_std().unwrap().into(),
                            upstream: up.into(),
                            client_addr: caddr,
                            upstream_addr: upstream,
                            stats,
                            settings,
                        };
                        if let Err(e) = sockmap::relay(&sm, conn).await {
                            eprintln!("connection {id}: {e}");
                            errors.set(errors.get() + 1);
                        }
                        live.set(live.get() - 1);
                    });
                }
            }
        }
        let ended = poll_async(Duration::from_secs(20), "the connections to end", || {
            (live.get() == 0).then_some(())
        });
        assert!(
            ended.await.is_ok(),
            "{} connections still open 20 s after the clients finished",
            live.get()
        );
        sm.refresh_stats();
        // The scenario's client and the upstream's handler close their own
        // sockets on their threads: give them a moment before counting.
        let scenario = th.join().expect("scenario panicked");
        // (Bounded; a leak is reported in `fds_leaked` and asserted by the tests.)
        let _ = poll_async(
            Duration::from_secs(5),
            "the proxy's sockets to close",
            || (proxy_fds(addr.port(), upstream) == 0).then_some(()),
        )
        .await;
        let g = |c: &AtomicU64| c.load(Relaxed);
        let report = Report {
            spliced_to_upstream: g(&stats.spliced_to_upstream),
            spliced_to_client: g(&stats.spliced_to_client),
            copied_to_upstream: g(&stats.bytes_to_upstream),
            copied_to_client: g(&stats.bytes_to_client),
            fallbacks: g(&stats.splice_fallbacks),
            relay_errors: errors.get(),
            conns: id,
            half_spliced: sm.half_spliced(),
            integrity_resets: sm.integrity_resets(),
            trimmed: g(&stats.spliced_trimmed),
            demoted: sm.demoted(),
            entries: sm.map_entries(),
            fds_leaked: proxy_fds(addr.port(), upstream) as isize,
        };
        (scenario, report)
    })
}

/// A TCP server on 127.0.0.1:0 running `handle` for every connection on
/// its own thread, until the test process ends.
fn server(handle: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let handle = Arc::new(handle);
    thread::spawn(move || {
        for s in l.incoming() {
            let s = s.unwrap();
            let h = handle.clone();
            thread::spawn(move || h(s));
        }
    });
    addr
}

const MIB: u64 = 1 << 20;

/// Both directions at once: `up` bytes client→upstream, `down` bytes back.
/// Each side verifies what it receives and shuts its write side when done.
fn bulk(capacity: u32, up: u64, down: u64) -> Report {
    let server_got = Arc::new(AtomicU64::new(u64::MAX));
    let sg = server_got.clone();
    let upstream = server(move |mut s| {
        let mut w = s.try_clone().unwrap();
        let t = thread::spawn(move || {
            send_stream(&mut w, 2, down).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        sg.store(recv_stream(&mut s, 1).unwrap(), Relaxed);
        t.join().unwrap();
    });
    let (got, report) = with_proxy(capacity, None, upstream, move |addr| {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut w = s.try_clone().unwrap();
        let t = thread::spawn(move || {
            send_stream(&mut w, 1, up).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let got = recv_stream(&mut s, 2).unwrap();
        t.join().unwrap();
        got
    });
    assert_eq!(got, down, "client received");
    // The upstream reads its last bytes and the EOF on its own thread.
    until(Duration::from_secs(10), "the upstream's EOF", || {
        server_got.load(Relaxed) != u64::MAX
    });
    assert_eq!(server_got.load(Relaxed), up, "upstream received");
    report
}

fn assert_clean(r: &Report) {
    assert_eq!(r.integrity_resets, 0, "integrity resets: {r:?}");
    assert_eq!(r.entries, (0, 0, 0, 0), "map entries left: {r:?}");
    assert!(r.fds_leaked <= 0, "fds leaked: {r:?}");
}

// ------------------------------------------------------------------ tests

/// 1 GiB each way at once arrives byte-exact, and the kernel's counters
/// account for every byte: redirected by the verdict, plus the few copied in
/// userspace while the destination lagged (pass mode).
#[test]
fn bulk_1gib_both_directions_byte_exact() {
    let n: u64 = std::env::var("BULK_MIB")
        .map(|v| v.parse().unwrap())
        .unwrap_or(1024)
        * MIB;
    let r = bulk(64, n, n);
    eprintln!("{r:?}");
    assert_eq!(r.spliced_to_upstream + r.copied_to_upstream, n, "{r:?}");
    assert_eq!(r.spliced_to_client + r.copied_to_client, n, "{r:?}");
    assert_eq!(r.fallbacks, 0);
    assert_eq!(r.relay_errors, 0);
    assert_clean(&r);
}

/// Clients and servers that speak first: the client writes on connect, the
/// upstream writes on accept, both before (or while) the proxy inserts the
/// sockets. 10,000 connections, each checking order and content.
#[test]
fn speak_first_both_sides_10000() {
    let upstream = server(|mut s| {
        let mut hello = [0u8; 64];
        // Speak first: greeting before reading anything.
        s.write_all(&[b'S'; 64]).unwrap();
        s.read_exact(&mut hello).unwrap();
        hello.reverse();
        s.write_all(&hello).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    });
    let (bad, r) = with_proxy(1024, None, upstream, |addr| {
        let bad = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let bad = bad.clone();
                thread::spawn(move || {
                    for i in 0..2500u64 {
                        let mut s = TcpStream::connect(addr).unwrap();
                        let mut hello = [0u8; 64];
                        hello[..16].copy_from_slice(&(t * 1_000_000 + i).to_le_bytes().repeat(2));
                        hello[16..].fill(b'c');
                        s.write_all(&hello).unwrap();
                        let mut got = Vec::new();
                        s.read_to_end(&mut got).unwrap();
                        let mut want = vec![b'S'; 64];
                        hello.reverse();
                        want.extend_from_slice(&hello);
                        if got != want {
                            bad.fetch_add(1, Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        bad.load(Relaxed)
    });
    eprintln!("{r:?}");
    assert_eq!(bad, 0, "connections with wrong bytes");
    assert_eq!(r.conns, 10_000);
    assert_eq!(r.relay_errors, 0, "{r:?}");
    // Every byte went through the kernel: 64 up, 128 down per connection.
    assert_eq!(
        r.spliced_to_upstream + r.copied_to_upstream,
        64 * 10_000,
        "{r:?}"
    );
    assert_eq!(
        r.spliced_to_client + r.copied_to_client,
        128 * 10_000,
        "{r:?}"
    );
    assert_clean(&r);
}

/// Half-close under load, client side: while the upstream streams back,
/// the client sends 64 MiB and shuts its write side. The upstream sees
/// exactly 64 MiB then EOF, and the whole response still arrives.
#[test]
fn half_close_from_client_under_load() {
    let r = bulk(64, 64 * MIB, 160 * MIB);
    assert_eq!(r.relay_errors, 0, "{r:?}");
    assert_clean(&r);
}

/// The same from the server side: the upstream sends 64 MiB and shuts its
/// write side while the client is still sending.
#[test]
fn half_close_from_server_under_load() {
    let r = bulk(64, 160 * MIB, 64 * MIB);
    assert_eq!(r.relay_errors, 0, "{r:?}");
    assert_clean(&r);
}

/// A slow reader gets backpressure: while the upstream does not read, the
/// client can only fill the socket buffers plus the bytes the kernel holds
/// for the stalled destination, which the engine's in-flight cap limits
/// (without it the kernel queues without limit: 256 MiB in the notes, here
/// nearly all of the 192 MiB sent). Then the reader catches up and every
/// byte arrives in order.
///
/// What the bound may and may not assume. This kernel lets TCP buffers grow
/// to `tcp_rmem[2]` = 32 MiB, so between the four sockets autotuning alone
/// may hold 72 MiB; the test runs in a namespace of its own with 4 MiB
/// maxima instead. And the cap is enforced on the driver's tick (2 ms while
/// bytes move), so a bulk half runs past it by what it carries until the
/// tick acts: 6-7 MB under a CPU hog with two test loops on two CPUs
/// (10-11 MB spliced through the 4 MiB cap). The bound allows 64 MiB of
/// that, far above what was seen, and still fails a proxy without the cap.
#[test]
fn slow_reader_is_bounded_and_lossless() {
    const TOTAL: u64 = 192 * MIB;
    const BUF_MAX: u64 = 4 * MIB;
    const CAP: u64 = 4 * MIB;
    const OVERRUN: u64 = 64 * MIB;
    // Client send buffer, both receive buffers, the proxy's upstream send buffer.
    const BOUND: u64 = 4 * BUF_MAX + CAP + OVERRUN;
    let limits = format!("4096 131072 {BUF_MAX}");
    private_netns(&[("ipv4/tcp_rmem", &limits), ("ipv4/tcp_wmem", &limits)]);
    let go = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let got = Arc::new(AtomicU64::new(0));
    let (go2, got2) = (go.clone(), got.clone());
    let upstream = server(move |mut s| {
        let (m, cv) = &*go2;
        let mut started = m.lock().unwrap();
        while !*started {
            started = cv.wait(started).unwrap();
        }
        drop(started);
        // Slowly at first (64 KiB every 2 ms for 0.5 s), then at full speed.
        let mut g = Prng::new(7);
        let mut buf = vec![0u8; 64 * 1024];
        let mut want = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        let t = Instant::now();
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            g.fill(&mut want[..n]);
            assert_eq!(buf[..n], want[..n], "byte {total}..");
            total += n as u64;
            if t.elapsed() < Duration::from_millis(500) {
                // The traffic pattern, not a synchronisation: a slow reader for the first
                // half second, so the proxy meets backpressure.
                thread::sleep(Duration::from_millis(2));
            }
        }
        got2.store(total, Relaxed);
    });
    let pushed = Arc::new(AtomicU64::new(0));
    let p2 = pushed.clone();
    let tune = |t: &mut sockmap::Tuning| t.inflight = CAP;
    let (stalled_at, r) =
        with_proxy_tuned(test_policy(), None, 64, tune, None, upstream, move |addr| {
            let mut s = TcpStream::connect(addr).unwrap();
            let probe = s.try_clone().unwrap();
            let w = thread::spawn(move || {
                let mut g = Prng::new(7);
                let mut buf = vec![0u8; 64 * 1024];
                let mut left = TOTAL;
                while left > 0 {
                    let k = left.min(buf.len() as u64) as usize;
                    g.fill(&mut buf[..k]);
                    s.write_all(&buf[..k]).unwrap();
                    p2.fetch_add(k as u64, Relaxed);
                    left -= k as u64;
                }
                s.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).unwrap();
            });
            // The reader is not reading: how far does the writer get? Wait until it is blocked —
            // the proxy advertises a zero window, so the client's socket holds bytes it cannot
            // send, and nothing more was pushed since the last look — however long that takes.
            let mut last = u64::MAX;
            let blocked = wait_until(Duration::from_secs(120), || {
                let now = pushed.load(Relaxed);
                let (window, unsent) = send_window(&probe);
                // Past the cap: the client's window also closes for a moment while the
                // connection is set up, which is not the stall this is about.
                let stalled = now > CAP && window == 0 && unsent > 0 && now == last;
                last = now;
                // Everything pushed: it never blocked (the bound below fails).
                stalled || now == TOTAL
            });
            let stalled_at = pushed.load(Relaxed);
            assert!(
                blocked,
                "the writer never blocked ({stalled_at} bytes pushed)"
            );
            let (m, cv) = &*go;
            *m.lock().unwrap() = true;
            cv.notify_all();
            w.join().unwrap();
            stalled_at
        });
    eprintln!("writer stalled at {} MiB; {r:?}", stalled_at / MIB);
    assert!(
        stalled_at <= BOUND,
        "no backpressure: {stalled_at} bytes pushed into a stalled reader (bound {BOUND})"
    );
    assert_eq!(got.load(Relaxed), TOTAL);
    assert_eq!(r.spliced_to_upstream + r.copied_to_upstream, TOTAL, "{r:?}");
    assert_eq!(r.relay_errors, 0, "{r:?}");
    assert_clean(&r);
}

/// The receive window the peer of `s` advertises, and the bytes queued in `s` not sent yet
/// (`TCP_INFO`: `tcpi_snd_wnd`, `tcpi_notsent_bytes`).
fn send_window(s: &TcpStream) -> (u32, u32) {
    let info = ambassador::bpf::tcp_info(s).expect("TCP_INFO");
    (info.tcpi_snd_wnd, info.tcpi_notsent_bytes)
}

/// How a reset test's far side ends.
fn read_outcome(s: &mut TcpStream) -> io::Result<usize> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(e) => return Err(e),
        }
    }
}

fn set_linger0(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

/// A client that resets mid-stream resets the upstream connection.
#[test]
fn reset_from_client_resets_upstream() {
    let outcome = Arc::new(Mutex::new(None));
    let got_bytes = Arc::new(AtomicBool::new(false));
    let (o2, g2) = (outcome.clone(), got_bytes.clone());
    let upstream = server(move |mut s| {
        s.write_all(b"hello").unwrap();
        let mut b = [0u8; 1000];
        s.read_exact(&mut b).unwrap();
        g2.store(true, Relaxed);
        *o2.lock().unwrap() = Some(read_outcome(&mut s).map_err(|e| e.kind()));
    });
    let o3 = outcome.clone();
    let (_, r) = with_proxy(64, None, upstream, move |addr| {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        s.write_all(&[1u8; 1000]).unwrap();
        // Reset with the stream in use: once the bytes went through.
        until(Duration::from_secs(10), "1000 bytes upstream", || {
            got_bytes.load(Relaxed)
        });
        set_linger0(&s);
        drop(s);
        until(
            Duration::from_secs(10),
            "the upstream to see the end",
            || o3.lock().unwrap().is_some(),
        );
    });
    let o = outcome.lock().unwrap().take().expect("upstream finished");
    assert_eq!(o, Err(io::ErrorKind::ConnectionReset), "upstream saw {o:?}");
    assert_eq!(r.relay_errors, 1, "{r:?}");
    assert_clean(&r);
}

/// An upstream that resets resets the client connection.
#[test]
fn reset_from_upstream_resets_client() {
    let upstream = server(move |mut s| {
        s.write_all(b"hello").unwrap();
        let mut b = [0u8; 1000];
        s.read_exact(&mut b).unwrap();
        set_linger0(&s);
    });
    let (o, r) = with_proxy(64, None, upstream, |addr| {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        s.write_all(&[1u8; 1000]).unwrap();
        read_outcome(&mut s).map_err(|e| e.kind())
    });
    assert_eq!(o, Err(io::ErrorKind::ConnectionReset), "client saw {o:?}");
    assert_eq!(r.relay_errors, 1, "{r:?}");
    assert_clean(&r);
}

/// 100,000 short connections (request, response, close): every one is
/// spliced and afterwards no map entry, counter or fd is left behind.
#[test]
fn short_connections_100000_leave_nothing() {
    let upstream = server(|mut s| {
        let mut b = [0u8; 16];
        s.read_exact(&mut b).unwrap();
        s.write_all(&b).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let _ = s.read(&mut b);
    });
    let n_per: u64 = std::env::var("SHORT_CONNS")
        .map(|v| v.parse().unwrap())
        .unwrap_or(100_000)
        / 4;
    let (bad, r) = with_proxy(1024, None, upstream, move |addr| {
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                thread::spawn(move || {
                    let mut bad = 0;
                    for i in 0..n_per {
                        let mut s = TcpStream::connect(addr).unwrap();
                        let b = (t << 48 | i).to_le_bytes().repeat(2);
                        s.write_all(&b).unwrap();
                        let mut got = Vec::new();
                        s.read_to_end(&mut got).unwrap();
                        if got != b {
                            bad += 1;
                        }
                    }
                    bad
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum::<u64>()
    });
    eprintln!("{r:?}");
    assert_eq!(bad, 0);
    assert_eq!(r.conns, 4 * n_per);
    assert_eq!(r.fallbacks, 0, "{r:?}");
    assert_eq!(r.relay_errors, 0, "{r:?}");
    assert_eq!(r.spliced_to_upstream + r.copied_to_upstream, 16 * 4 * n_per);
    assert_clean(&r);
}

/// A full map sends new connections to the userspace path, counted; they
/// still work, and splicing resumes once room frees up.
#[test]
fn full_map_falls_back_to_userspace() {
    let upstream = server(|mut s| {
        let mut b = [0u8; 4096];
        loop {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => s.write_all(&b[..n]).unwrap(),
            }
        }
    });
    let (_, r) = with_proxy(2, None, upstream, move |addr| {
        // Four at once in a map with room for two.
        let mut conns: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // All four are relayed (a client and an upstream socket each) before any byte moves.
        until(Duration::from_secs(10), "4 relayed connections", || {
            proxy_fds(addr.port(), upstream) == 8
        });
        for (i, s) in conns.iter_mut().enumerate() {
            let msg = [i as u8; 100];
            s.write_all(&msg).unwrap();
            let mut got = [0u8; 100];
            s.read_exact(&mut got).unwrap();
            assert_eq!(got, msg);
        }
        drop(conns);
        // Their relays ended (sockets closed after the map entries went, on the proxy's one
        // thread, which accepts the next client only after that).
        until(Duration::from_secs(10), "the 4 relays to end", || {
            proxy_fds(addr.port(), upstream) == 0
        });
        // Room again: this one is spliced.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&[9u8; 100]).unwrap();
        let mut got = [0u8; 100];
        s.read_exact(&mut got).unwrap();
    });
    eprintln!("{r:?}");
    assert_eq!(r.fallbacks, 2, "{r:?}");
    assert_eq!(
        r.spliced_to_upstream, 300,
        "three spliced connections, 100 bytes each: {r:?}"
    );
    assert_eq!(r.copied_to_upstream, 200, "two copied: {r:?}");
    assert_clean(&r);
}

/// `--idle-timeout` closes a spliced connection that moves nothing.
#[test]
fn idle_timeout_closes_spliced_connection() {
    let upstream = server(|mut s| {
        let _ = read_outcome(&mut s);
    });
    let (elapsed, r) = with_proxy(8, Some(Duration::from_millis(700)), upstream, |addr| {
        let mut s = TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        s.write_all(b"x").unwrap();
        let o = read_outcome(&mut s);
        assert!(o.is_ok(), "{o:?}");
        t.elapsed()
    });
    assert!(
        elapsed >= Duration::from_millis(600) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    assert_clean(&r);
}

// ------------------------------------------------------- the binary itself

/// The binary, started with `args` (plus `pre` applied in the child before
/// exec), its stderr collected; returns once it logged `ready` (or exited).
struct Bin {
    child: std::process::Child,
    log: Arc<Mutex<String>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Bin {
    fn start(wrapper: &[&str], args: &[&str], deny_uring: bool) -> Bin {
        let exe = env!("CARGO_BIN_EXE_ambassador");
        let mut cmd = if wrapper.is_empty() {
            Command::new(exe)
        } else {
            // `WRAPPER... ambassador ARGS`
            let mut c = Command::new(wrapper[0]);
            c.args(&wrapper[1..]).arg(exe);
            c
        };
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if deny_uring {
            use std::os::unix::process::CommandExt;
            // Safety: only async-signal-safe prctl calls between fork and exec.
            // The io_uring_setup refusal of Docker's default profile (built before fork).
            let f = ambassador_test_support::seccomp::deny(&[libc::SYS_io_uring_setup]).unwrap();
            unsafe { cmd.pre_exec(move || f.apply()) };
        }
        let mut child = cmd.spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (l2, err) = (log.clone(), child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = thread::spawn(move || {
            use std::io::BufRead;
            for line in io::BufReader::new(err).lines().map_while(Result::ok) {
                let ready = line.contains(" ready ");
                l2.lock().unwrap().push_str(&(line + "\n"));
                if ready {
                    let _ = tx.send(());
                }
            }
        });
        let _ = rx.recv_timeout(Duration::from_secs(10));
        Bin {
            child,
            log,
            reader: Some(reader),
        }
    }

    /// Wait until the proxy holds no socket of the forward `listen` → `upstream` any more: its
    /// connections ended and their counters are in its totals.
    fn wait_relays_end(&self, listen: u16, upstream: SocketAddr) {
        until(
            Duration::from_secs(10),
            "the binary's relays to end",
            || fds_of(self.child.id(), listen, upstream) == 0,
        );
    }

    /// SIGTERM, wait, and return (exit code, whole log).
    fn stop(mut self) -> (Option<i32>, String) {
        // Safety: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait()
    }

    /// The binary's counters now: SIGUSR1, then the `stats` line it logs.
    fn stats_now(&self) -> String {
        let seen = self.log.lock().unwrap().matches(" stats ").count();
        // Safety: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGUSR1) };
        poll(
            Duration::from_secs(10),
            "a stats line after SIGUSR1",
            || {
                let log = self.log.lock().unwrap();
                (log.matches(" stats ").count() > seen)
                    .then(|| stats_line(&log, "").unwrap().to_string())
            },
        )
        .unwrap()
    }

    fn wait(&mut self) -> (Option<i32>, String) {
        let st = self.child.wait().unwrap();
        self.reader.take().unwrap().join().unwrap();
        (st.code(), self.log.lock().unwrap().clone())
    }
}

/// A test that fails leaves no proxy behind: kill and reap the binary if it
/// still runs (`stop` and `wait` already reaped it otherwise).
impl Drop for Bin {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The number after `key=` in the last `stats` line.
fn stat(log: &str, key: &str) -> u64 {
    stat_in(stats_line(log, "").expect("a stats line"), key).unwrap()
}

/// Proof of splice through the real binary: 1 MiB each way (below the
/// in-flight cap, so never passed to userspace) is counted as spliced and
/// userspace copies 0 bytes.
#[test]
fn binary_stats_prove_bytes_were_spliced() {
    let upstream = server(|mut s| {
        let mut w = s.try_clone().unwrap();
        let t = thread::spawn(move || {
            send_stream(&mut w, 4, MIB).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        assert_eq!(recv_stream(&mut s, 3).unwrap(), MIB);
        t.join().unwrap();
    });
    let port = free_port();
    let fwd = format!("127.0.0.1:{port}={upstream}");
    let bin = Bin::start(
        &[],
        &["--mode", "sockmap", "--splice", "always", "--forward", &fwd],
        false,
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut w = s.try_clone().unwrap();
    let t = thread::spawn(move || {
        send_stream(&mut w, 3, MIB).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    assert_eq!(recv_stream(&mut s, 4).unwrap(), MIB);
    t.join().unwrap();
    drop(s);
    bin.wait_relays_end(port, upstream);
    let (code, log) = bin.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("engine chosen engine=sockmap"), "{log}");
    assert_eq!(stat(&log, "spliced_to_upstream"), MIB, "{log}");
    assert_eq!(stat(&log, "spliced_to_client"), MIB, "{log}");
    assert_eq!(stat(&log, "bytes_to_upstream"), 0, "{log}");
    assert_eq!(stat(&log, "bytes_to_client"), 0, "{log}");
    assert_eq!(stat(&log, "splice_fallbacks"), 0, "{log}");
}

/// `capsh --drop=… -- -c 'exec "$0" "$@"' ambassador ARGS`
const NO_BPF_CAPS: &[&str] = &[
    "capsh",
    "--drop=cap_bpf,cap_net_admin,cap_sys_admin",
    "--",
    "-c",
    "exec \"$0\" \"$@\"",
];

/// Without CAP_BPF/CAP_NET_ADMIN/CAP_SYS_ADMIN, `auto` skips sockmap with
/// the exact reason and picks io_uring; with io_uring also denied (seccomp,
/// as in Docker) it picks epoll. Each still forwards.
#[test]
fn fallback_matrix_without_bpf_caps() {
    let upstream = server(|mut s| {
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        s.write_all(&b).unwrap();
    });
    for (deny_uring, want) in [(false, "uring"), (true, "epoll")] {
        let port = free_port();
        let fwd = format!("127.0.0.1:{port}={upstream}");
        let bin = Bin::start(NO_BPF_CAPS, &["--forward", &fwd], deny_uring);
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"hello").unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hello");
        drop(s);
        let (code, log) = bin.stop();
        assert_eq!(code, Some(0), "{log}");
        assert!(
            log.contains("engine skipped engine=sockmap reason=BPF_MAP_CREATE: EPERM — needs CAP_BPF and CAP_NET_ADMIN"),
            "{log}"
        );
        if deny_uring {
            assert!(log.contains("engine skipped engine=uring reason="), "{log}");
        }
        assert!(
            log.contains(&format!("engine chosen engine={want} mode=auto")),
            "{log}"
        );
    }
}

/// `--mode sockmap` that cannot load the program exits 1 with the reason.
#[test]
fn explicit_sockmap_without_caps_fails_with_reason() {
    let port = free_port();
    let fwd = format!("127.0.0.1:{port}=127.0.0.1:9");
    let mut bin = Bin::start(
        NO_BPF_CAPS,
        &["--mode", "sockmap", "--forward", &fwd],
        false,
    );
    let (code, log) = bin.wait();
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("BPF_MAP_CREATE: EPERM — needs CAP_BPF and CAP_NET_ADMIN"),
        "{log}"
    );
}

// ------------------------------------------------------------ measurement

/// Not a test: the side-by-side measurement behind docs/sockmap.md, run by
/// hand with `cargo test --release --test sockmap -- --ignored --nocapture
/// measure`. Everything (load generator, upstream, proxy, and so the
/// softirq and kworker work of loopback) is pinned to CPU 0; engines run
/// alternately and the medians of `ROUNDS` rounds are printed.
#[test]
#[ignore]
fn measure_sockmap_vs_copy_vs_direct() {
    const ROUNDS: usize = 5;
    let bytes: u64 = std::env::var("MEASURE_MIB")
        .map(|v| v.parse().unwrap())
        .unwrap_or(512)
        * MIB;
    pin_to_cpu0();
    // Upstream: a sink for throughput runs (marked by a first byte of 1)
    // and an echo for latency runs (first byte 0).
    let upstream = server(|mut s| {
        let mut b = vec![0u8; 256 * 1024];
        let mut kind = [0u8; 1];
        if s.read_exact(&mut kind).is_err() {
            return;
        }
        loop {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) if kind[0] == 0 => s.write_all(&b[..n]).unwrap(),
                Ok(_) => {}
            }
        }
    });
    let all = std::env::var("MEASURE_MODES").unwrap_or("direct,epoll,uring,sockmap".into());
    let modes: Vec<&'static str> = all
        .split(',')
        .map(|m| &*String::leak(m.to_string()))
        .collect();
    let mut res: std::collections::BTreeMap<&str, Vec<(f64, f64, f64, f64)>> = Default::default();
    for _ in 0..ROUNDS {
        for &mode in &modes {
            let (bin, addr) = if mode == "direct" {
                (None, upstream)
            } else {
                let port = free_port();
                let fwd = format!("127.0.0.1:{port}={upstream}");
                let splice = std::env::var("MEASURE_SPLICE").unwrap_or("always".into());
                let args = ["--mode", mode, "--splice", &splice, "--forward", &fwd];
                let b = Bin::start(&["taskset", "-c", "0"], &args, false);
                (Some(b), SocketAddr::from(([127, 0, 0, 1], port)))
            };
            let pid = bin.as_ref().map(|b| b.child.id());
            // Latency: 64-byte round trips.
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_nodelay(true).unwrap();
            s.write_all(&[0]).unwrap();
            let mut rtts = Vec::with_capacity(5000);
            let msg = [7u8; 64];
            let mut back = [0u8; 64];
            for i in 0..5500 {
                let t = Instant::now();
                s.write_all(&msg).unwrap();
                s.read_exact(&mut back).unwrap();
                if i >= 500 {
                    rtts.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
            drop(s);
            rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let p50 = rtts[rtts.len() / 2];
            // Throughput and CPU: one stream of `bytes` into the sink.
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&[1]).unwrap();
            let buf = vec![0x5au8; 256 * 1024];
            let (cpu0, proc0, t) = (
                cpu0_busy(),
                pid.map(proc_cpu).unwrap_or(0.0),
                Instant::now(),
            );
            let mut left = bytes;
            while left > 0 {
                let k = left.min(buf.len() as u64) as usize;
                s.write_all(&buf[..k]).unwrap();
                left -= k as u64;
            }
            s.shutdown(Shutdown::Write).unwrap();
            let mut rest = [0u8; 16];
            let _ = s.read(&mut rest); // EOF once the sink closed: all bytes arrived
            let secs = t.elapsed().as_secs_f64();
            let gib = bytes as f64 / (1u64 << 30) as f64;
            let sys = (cpu0_busy() - cpu0) / gib;
            let own = (pid.map(proc_cpu).unwrap_or(0.0) - proc0) / gib;
            res.entry(mode)
                .or_default()
                .push((p50, bytes as f64 / MIB as f64 / secs, own, sys));
            if let Some(b) = bin {
                let (_, log) = b.stop();
                if mode == "sockmap" {
                    let st = log
                        .lines()
                        .rev()
                        .find(|l| l.contains(" stats "))
                        .unwrap_or("");
                    println!("{}", &st[st.find("conns_total").unwrap_or(0)..]);
                }
            }
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    println!(
        "| engine | p50 RTT 64 B (µs) | single stream (MiB/s) | proxy CPU s/GiB | CPU0 busy s/GiB |"
    );
    println!("|---|---|---|---|---|");
    for &mode in &modes {
        let r = &res[mode];
        let col = |f: fn(&(f64, f64, f64, f64)) -> f64| med(&mut r.iter().map(f).collect());
        println!(
            "| {mode} | {:.1} | {:.0} | {:.2} | {:.2} |",
            col(|x| x.0),
            col(|x| x.1),
            col(|x| x.2),
            col(|x| x.3)
        );
    }
    for &mode in &modes {
        println!("{mode} raw: {:?}", res[mode]);
    }
}

fn pin_to_cpu0() {
    // Safety: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Busy seconds of CPU 0 (everything but idle and iowait) from /proc/stat.
fn cpu0_busy() -> f64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap();
    let line = s.lines().find(|l| l.starts_with("cpu0 ")).unwrap();
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let busy: f64 = v.iter().take(8).sum::<f64>() - v[3] - v[4];
    busy / 100.0 // USER_HZ
}

/// utime + stime of a process, in seconds.
fn proc_cpu(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// `--splice adaptive`: a connection that starts request/response is
/// promoted into the kernel after 4 round trips (the pongs after that are
/// spliced), then turns bulk and leaves the kernel for the copy loop (here
/// at a known point: after 1 MiB redirected), without losing or repeating
/// a byte.
#[test]
fn adaptive_promotes_then_leaves_the_kernel_byte_exact() {
    let n = 256 * MIB;
    let upstream = server(move |mut s| {
        let mut b = [0u8; 1];
        for i in 0..8u8 {
            s.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i, "ping {i} in order");
            s.write_all(&[b[0] ^ 0xff]).unwrap();
        }
        let got = recv_stream(&mut s, 11).unwrap();
        s.write_all(&got.to_le_bytes()).unwrap();
    });
    let policy = SplicePolicy::Adaptive;
    let (got, r) = with_proxy_policy(policy, Some(MIB), 8, None, upstream, move |addr| {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut b = [0u8; 1];
        for i in 0..8u8 {
            s.write_all(&[i]).unwrap();
            s.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i ^ 0xff, "pong {i} in order");
        }
        send_stream(&mut s, 11, n).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut b = [0u8; 8];
        s.read_exact(&mut b).unwrap();
        u64::from_le_bytes(b)
    });
    eprintln!("{r:?}");
    assert_eq!(got, n, "upstream received");
    assert_eq!(r.spliced_to_upstream + r.copied_to_upstream, n + 8, "{r:?}");
    assert_eq!(
        r.copied_to_client,
        4 + 8,
        "4 pongs before, the reply after: {r:?}"
    );
    assert_eq!(r.spliced_to_client, 4, "4 pongs after the promotion: {r:?}");
    assert!(r.spliced_to_upstream >= 4 + MIB, "{r:?}");
    assert_eq!(r.demoted, 1, "the connection left the kernel: {r:?}");
    assert_eq!(r.relay_errors, 0, "{r:?}");
    assert_clean(&r);
}

/// Four ping/pong round trips: with `--splice adaptive` the connection is
/// promoted into the kernel right after them (client side).
fn ping_pong_client(s: &mut TcpStream) {
    let mut b = [0u8; 1];
    for i in 0..8u8 {
        s.write_all(&[i]).unwrap();
        s.read_exact(&mut b).unwrap();
        assert_eq!(b[0], i ^ 0xff, "pong {i} in order");
    }
}

/// The upstream side of [`ping_pong_client`].
fn ping_pong_server(s: &mut TcpStream) {
    let mut b = [0u8; 1];
    for i in 0..8u8 {
        s.read_exact(&mut b).unwrap();
        assert_eq!(b[0], i, "ping {i} in order");
        s.write_all(&[b[0] ^ 0xff]).unwrap();
    }
}

/// After a promotion, the client half-closes: the upstream sees every
/// byte of the request, then EOF, and its answer still reaches the client
/// (both halves forwarded their FIN in the kernel path).
#[test]
fn adaptive_half_close_after_promotion() {
    let upstream = server(move |mut s| {
        ping_pong_server(&mut s);
        let got = recv_stream(&mut s, 21).unwrap();
        s.write_all(&got.to_le_bytes()).unwrap();
        send_stream(&mut s, 22, 3 * MIB).unwrap();
    });
    let policy = SplicePolicy::Adaptive;
    let (got, r) = with_proxy_policy(policy, None, 8, None, upstream, move |addr| {
        let mut s = TcpStream::connect(addr).unwrap();
        ping_pong_client(&mut s);
        send_stream(&mut s, 21, MIB).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut b = [0u8; 8];
        s.read_exact(&mut b).unwrap();
        (u64::from_le_bytes(b), recv_stream(&mut s, 22).unwrap())
    });
    assert_eq!(got, (MIB, 3 * MIB), "{r:?}");
    assert!(r.spliced_to_client >= 4, "pongs 4..8 were spliced: {r:?}");
    assert_eq!(r.relay_errors, 0, "{r:?}");
    assert_clean(&r);
}

/// After a promotion, the upstream resets: the client sees a reset, not a
/// clean end, and nothing is left in the maps.
#[test]
fn adaptive_reset_after_promotion() {
    let upstream = server(move |mut s| {
        ping_pong_server(&mut s);
        // Reset only once the client has read every pong (its "done" byte),
        // so the reset cannot discard a pong still on its way.
        let mut done = [0u8; 1];
        s.read_exact(&mut done).unwrap();
        set_linger0(&s);
    });
    let policy = SplicePolicy::Adaptive;
    let (end, r) = with_proxy_policy(policy, None, 8, None, upstream, move |addr| {
        let mut s = TcpStream::connect(addr).unwrap();
        ping_pong_client(&mut s);
        s.write_all(b"d").unwrap();
        read_outcome(&mut s).map_err(|e| e.kind())
    });
    assert_eq!(end, Err(io::ErrorKind::ConnectionReset), "{r:?}");
    assert_eq!(r.spliced_to_client, 4, "pongs 4..8 were spliced: {r:?}");
    assert_eq!(
        r.spliced_to_upstream, 5,
        "pings 4..8 and the done byte: {r:?}"
    );
    assert_clean(&r);
}

/// The kernel path's failure, made deterministic: a socket whose first skb
/// userspace has partly read is spliced. The kernel hands the program the
/// whole skb, read part included (`tcp_read_skb` ignores `copied_seq`), so
/// the upstream would get those bytes twice. Where the program cuts
/// overlaps, it reads the socket's `copied_seq` at that first skb and cuts
/// the read part: the upstream gets every byte once and the stream ends
/// cleanly. Where it cannot cut (here: the engine loaded on a thread without
/// CAP_PERFMON and CAP_SYS_ADMIN), byte conservation sees more bytes leave
/// the source than TCP received and resets both sides: loud, not silent.
/// Both are checked, so the books' detector is proved on every run.
#[test]
fn a_partly_read_first_skb_is_cut_or_reset() {
    partly_read_first_skb(true);
    // Capabilities are per thread: only this one loses them, for a while.
    let lose = [
        caps::Capability::CAP_PERFMON,
        caps::Capability::CAP_SYS_ADMIN,
    ];
    for c in lose {
        caps::drop(None, caps::CapSet::Effective, c).unwrap();
    }
    let r = std::panic::catch_unwind(|| partly_read_first_skb(false));
    for c in lose {
        caps::raise(None, caps::CapSet::Effective, c).unwrap();
    }
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

fn partly_read_first_skb(may_cut: bool) {
    const SENT: usize = 100_000;
    const READ: usize = 1000;
    let got = Arc::new(Mutex::new(None));
    let seen = Arc::new(AtomicU64::new(0));
    let (g2, seen2) = (got.clone(), seen.clone());
    let upstream = server(move |mut s| {
        let mut all = Vec::new();
        let mut buf = [0u8; 16 << 10];
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    seen2.store(all.len() as u64, Relaxed);
                }
                Err(e) => break Err(e.kind()),
            }
        };
        *g2.lock().unwrap() = Some((all, end));
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let (client, result, resets, trimmed, cuts) = local.block_on(&rt, async move {
        let sm = Rc::new(sockmap_engine(SplicePolicy::Always, 8, None, |_| {}));
        let cuts = sm.trims().is_ok();
        assert_eq!(cuts, may_cut, "{:?}", sm.trims());
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut a, caddr) = l.accept().unwrap();
        client.write_all(&vec![7u8; SENT]).unwrap();
        // Wait (bounded) until all of it is queued on the proxy's socket.
        // (A blocking wait: only the kernel moves these bytes, no task of this runtime.)
        until(
            Duration::from_secs(5),
            "the data on the proxy's socket",
            || ambassador::bpf::inq(&a).unwrap() >= SENT as u64,
        );
        let mut part = [0u8; READ];
        a.read_exact(&mut part).unwrap(); // part of the first skb
        let up = TcpStream::connect(upstream).unwrap();
        a.set_nonblocking(true).unwrap();
        up.set_nonblocking(true).unwrap();
        let conn = Conn {
            id: 1,
            forward: "test".into(),
            client: a.into(),
            upstream: up.into(),
            client_addr: caddr,
            upstream_addr: upstream,
            stats: Arc::new(ForwardStats::default()),
            settings: std::sync::Arc::new(settings(None)),
        };
        let stats = conn.stats.clone();
        // Once the upstream has what is left, the client ends its half (a FIN
        // sent before the insert would keep the socket out of the maps).
        let closer = client.try_clone().unwrap();
        let ender = thread::spawn(move || {
            let all = wait_until(Duration::from_secs(10), || {
                seen.load(Relaxed) >= (SENT - READ) as u64
            });
            let _ = closer.shutdown(Shutdown::Write);
            all
        });
        let r = sockmap::splice(&sm, conn, [READ as u64, 0]).await;
        let _ = ender.join();
        (
            client,
            r,
            sm.integrity_resets(),
            stats.spliced_trimmed.load(Relaxed),
            cuts,
        )
    });
    until(Duration::from_secs(5), "the upstream's end", || {
        got.lock().unwrap().is_some()
    });
    let (all, end) = got.lock().unwrap().take().unwrap();
    let mut client = client;
    if cuts {
        result.expect("spliced to the end");
        assert_eq!(resets, 0);
        assert_eq!(trimmed, READ as u64, "the read part was cut");
        assert_eq!(all.len(), SENT - READ, "every unread byte, once");
        assert!(all.iter().all(|&b| b == 7));
        assert_eq!(end, Ok(()));
        assert_eq!(read_outcome(&mut client).unwrap(), 0, "a clean end");
    } else {
        eprintln!("the program cannot cut here: checking the reset");
        let e = result.expect_err("the duplicate must not go unnoticed");
        assert!(e.to_string().contains("integrity check failed"), "{e}");
        assert!(e.to_string().contains("duplicated"), "{e}");
        assert_eq!(resets, 1);
        // Both sides learn the stream broke: a reset, never a clean end.
        assert!(
            matches!(read_outcome(&mut client), Err(ref e) if e.kind() == io::ErrorKind::ConnectionReset),
            "client must see a reset"
        );
        assert_eq!(
            end,
            Err(io::ErrorKind::ConnectionReset),
            "upstream must see a reset after {} bytes",
            all.len()
        );
    }
}

/// The acceptance loop for the overlap cut (docs/sockmap.md, "Overlapping
/// skbs"): `AMBASSADOR_OVERLAP_ROUNDS` (default 300) connections of 256 MiB
/// each way at once, `--splice always`, one proxy each. Every one must end
/// byte-exact with no integrity reset; prints how many bytes were cut. Run
/// unpinned, and again under a CPU hog: that is where spurious loss probes
/// (and so overlapping skbs) happen.
#[test]
#[ignore = "acceptance soak: minutes; run by hand (docs/sockmap.md)"]
fn overlap_soak_bulk_both_ways() {
    let rounds: u64 = std::env::var("AMBASSADOR_OVERLAP_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let (mut trimmed, mut cut_rounds, mut resets) = (0, 0, 0);
    for i in 0..rounds {
        let r = bulk(8, 256 * MIB, 256 * MIB);
        trimmed += r.trimmed;
        cut_rounds += u64::from(r.trimmed > 0);
        resets += r.integrity_resets;
        if r.trimmed > 0 || r.integrity_resets > 0 {
            eprintln!("round {i}: {r:?}");
        }
        assert_clean(&r);
    }
    eprintln!(
        "overlap soak: {rounds} rounds, {cut_rounds} with cuts, {trimmed} bytes cut, {resets} resets"
    );
}

/// `--splice adaptive`: short request/response connections and one-way
/// bulk never enter the maps (no insert cost, the faster copy loop).
#[test]
fn adaptive_leaves_short_and_bulk_connections_in_userspace() {
    let upstream = server(move |mut s| {
        let mut b = [0u8; 4];
        if s.read_exact(&mut b).is_ok() && &b == b"PING" {
            s.write_all(b"PONG").unwrap();
            return;
        }
        let got = recv_stream(&mut s, 12).unwrap();
        s.write_all(&got.to_le_bytes()).unwrap();
    });
    let (_, r) = with_proxy_policy(
        SplicePolicy::Adaptive,
        None,
        64,
        None,
        upstream,
        move |addr| {
            for _ in 0..50 {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(b"PING").unwrap();
                let mut b = [0u8; 4];
                s.read_exact(&mut b).unwrap();
                assert_eq!(&b, b"PONG");
            }
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"BULK").unwrap();
            send_stream(&mut s, 12, 64 * MIB - 4).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
        },
    );
    assert_eq!(r.spliced_to_upstream + r.spliced_to_client, 0, "{r:?}");
    assert_eq!(r.copied_to_upstream, 50 * 4 + 64 * MIB, "{r:?}");
    assert_eq!(r.relay_errors, 0, "{r:?}");
    assert_clean(&r);
}

/// IPv6 on both sides, and an IPv4 client spliced to an IPv6 upstream
/// (cookies make the address family irrelevant to the maps).
#[test]
fn binary_ipv6_and_mixed_families_are_spliced() {
    let l = TcpListener::bind("[::1]:0").unwrap();
    let upstream = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let mut s = s.unwrap();
            thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let n = recv_stream(&mut s, 21).unwrap();
                send_stream(&mut w, 22, n).unwrap();
            });
        }
    });
    for listen in ["[::1]", "127.0.0.1"] {
        let port = free_port();
        let fwd = format!("{listen}:{port}={upstream}");
        let bin = Bin::start(
            &[],
            &["--mode", "sockmap", "--splice", "always", "--forward", &fwd],
            false,
        );
        let host = listen.trim_matches(|c| c == '[' || c == ']');
        let mut s = TcpStream::connect((host, port)).unwrap();
        send_stream(&mut s, 21, MIB).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        assert_eq!(recv_stream(&mut s, 22).unwrap(), MIB);
        drop(s);
        bin.wait_relays_end(port, upstream);
        let (code, log) = bin.stop();
        assert_eq!(code, Some(0), "{log}");
        assert_eq!(stat(&log, "spliced_to_upstream"), MIB, "{listen}: {log}");
        assert_eq!(stat(&log, "spliced_to_client"), MIB, "{listen}: {log}");
        assert_eq!(
            stat(&log, "bytes_to_upstream") + stat(&log, "bytes_to_client"),
            0,
            "{log}"
        );
    }
}

/// `bpf::consumed`, the exact check a connection passes when it leaves the
/// kernel, reads a plain socket's read position: bytes read so far, not
/// counting what waits, and not the FIN once it arrived.
#[test]
fn consumed_is_the_read_position_with_or_without_fin() {
    use ambassador::bpf;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut w = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut r, _) = l.accept().unwrap();
    let wait_inq = |r: &TcpStream, n: u64| {
        until(Duration::from_secs(5), "the bytes to arrive", || {
            bpf::inq(r).unwrap() >= n
        });
    };
    assert_eq!(bpf::consumed(&r).unwrap(), 0);
    w.write_all(&[7u8; 1000]).unwrap();
    wait_inq(&r, 1000);
    assert_eq!(
        bpf::consumed(&r).unwrap(),
        0,
        "waiting bytes are not consumed"
    );
    let mut buf = [0u8; 300];
    r.read_exact(&mut buf).unwrap();
    assert_eq!(bpf::consumed(&r).unwrap(), 300);
    w.shutdown(Shutdown::Write).unwrap();
    until(Duration::from_secs(5), "the FIN to arrive", || {
        bpf::bytes_received(&r).unwrap() >= 1001
    });
    assert_eq!(bpf::consumed(&r).unwrap(), 300, "the FIN is not a byte");
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len(), 700);
    assert_eq!(bpf::consumed(&r).unwrap(), 1000);
}

/// The copy loop of `--splice adaptive` (found by the soak): the upstream
/// half-closes, then the client's next small read asks for a promotion.
/// A connection with one direction at EOF cannot be spliced, so the loop
/// must finish the open direction itself; it used to carry the pending
/// pause request into that last copy, which then stopped at once and the
/// connection was closed with the client's stream cut short.
#[test]
fn adaptive_copy_loop_finishes_after_a_half_close_and_a_pause_request() {
    use ambassador::engine::epoll::{Outcome, Promote, relay_until};
    const N: u64 = 4 * MIB;
    let got = Arc::new(AtomicU64::new(u64::MAX));
    let got2 = got.clone();
    let upstream = server(move |mut s| {
        s.shutdown(Shutdown::Write).unwrap();
        got2.store(recv_stream(&mut s, 31).unwrap_or(0), Relaxed);
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        // Wait for the upstream's FIN to come through first.
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap(), 0);
        // With `turns: 0` the proxy's first read of it asks for a pause.
        send_stream(&mut s, 31, N).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    });
    let (c, caddr) = listener.accept().unwrap();
    let up = TcpStream::connect(upstream).unwrap();
    c.set_nonblocking(true).unwrap();
    up.set_nonblocking(true).unwrap();
    let conn = Conn {
        id: 1,
        forward: "test".into(),
        client: c.into(),
        upstream: up.into(),
        client_addr: caddr,
        upstream_addr: upstream,
        stats: Arc::new(ForwardStats::default()),
        settings: std::sync::Arc::new(settings(None)),
    };
    // Promote at the first quiet point: every read asks for a pause.
    let promote = Promote {
        turns: 0,
        small: 32 * 1024,
    };
    let out = rt.block_on(async { relay_until(conn, Some(promote)).await.unwrap() });
    assert!(
        matches!(out, Outcome::Done),
        "a half-closed connection cannot pause for a promotion"
    );
    client.join().unwrap();
    let _ = wait_until(Duration::from_secs(10), || got.load(Relaxed) != u64::MAX);
    assert_eq!(
        got.load(Relaxed),
        N,
        "the upstream got the client's whole stream"
    );
}

/// The adaptive copy loop pauses for promotion only when both directions
/// are at a pause point. Holding one direction while the other waited to
/// write used to deadlock against a peer that stops reading while its own
/// writes to us block (seen on the 6.1 and 6.12 guests). The peer here does
/// exactly that: one thread, 64 KiB written, then one read, with a 4 KiB
/// receive buffer; every read asks for a pause (`PROMOTE_TURNS=0`). Both
/// streams must still arrive whole.
#[test]
fn adaptive_pause_never_deadlocks_a_peer_that_writes_before_it_reads() {
    const BYTES: u64 = 16 << 20;
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.set_recv_buffer_size(4096).unwrap();
    l.set_send_buffer_size(4096).unwrap();
    l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    l.listen(16).unwrap();
    let l: TcpListener = l.into();
    let upstream = l.local_addr().unwrap();
    let peer_got = Arc::new(AtomicU64::new(u64::MAX));
    let pg = peer_got.clone();
    thread::spawn(move || {
        let mut s = l.accept().unwrap().0;
        let (mut out, mut inp) = (Prng::new(6), Prng::new(5));
        let (mut b, mut want) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
        let (mut sent, mut got, mut eof) = (0u64, 0u64, false);
        while sent < BYTES || !eof {
            if sent < BYTES {
                let k = (BYTES - sent).min(b.len() as u64) as usize;
                out.fill(&mut b[..k]);
                if s.write_all(&b[..k]).is_err() {
                    return;
                }
                sent += k as u64;
                if sent == BYTES {
                    let _ = s.shutdown(Shutdown::Write);
                }
            }
            if !eof {
                match s.read(&mut b) {
                    Ok(0) => eof = true,
                    Ok(n) => {
                        inp.fill(&mut want[..n]);
                        if b[..n] != want[..n] {
                            return;
                        }
                        got += n as u64;
                    }
                    Err(_) => return,
                }
            }
        }
        pg.store(got, Relaxed);
    });
    let port = free_port();
    let fwd = format!("127.0.0.1:{port}={upstream}");
    let bin = Bin::start(
        &["env", "AMBASSADOR_SOCKMAP_PROMOTE_TURNS=0"],
        &[
            "--mode",
            "sockmap",
            "--splice",
            "adaptive",
            "--forward",
            &fwd,
        ],
        false,
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let t = thread::spawn(move || {
        let r = send_stream(&mut w, 5, BYTES);
        let _ = w.shutdown(Shutdown::Write);
        r
    });
    let got = recv_stream(&mut s, 6);
    let sent = t.join().unwrap();
    ambassador_test_support::wait_until(Duration::from_secs(10), || {
        peer_got.load(Relaxed) != u64::MAX
    });
    let (code, log) = bin.stop();
    assert_eq!(
        got.ok(),
        Some(BYTES),
        "client's stream stalled or corrupted: {log}"
    );
    assert!(sent.is_ok(), "client's write stalled: {log}");
    assert_eq!(peer_got.load(Relaxed), BYTES, "peer's stream: {log}");
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(stat(&log, "integrity_resets"), 0, "{log}");
}

/// A request/response connection never lags its destination, so it stays
/// in the kernel however many bytes it carries: the program's budget must
/// roll with it. 64 KiB pings and pongs through `--splice always` carry 8×
/// a 32 MiB backstop each way, byte-exact, every byte spliced (none copied:
/// it never left the kernel) and no integrity reset. With a budget fixed at
/// insert the connection was reset once it had redirected the backstop.
#[test]
fn request_response_carries_many_backstops_in_the_kernel() {
    const MSG: usize = 64 << 10;
    const BACKSTOP: u64 = 32 * MIB;
    const ROUNDS: u64 = 8 * BACKSTOP / MSG as u64;
    let upstream = server(|mut s| {
        let (mut inp, mut out) = (Prng::new(21), Prng::new(22));
        let (mut b, mut want) = (vec![0u8; MSG], vec![0u8; MSG]);
        for _ in 0..ROUNDS {
            if s.read_exact(&mut b).is_err() {
                return;
            }
            inp.fill(&mut want);
            if b != want {
                return;
            }
            out.fill(&mut b);
            if s.write_all(&b).is_err() {
                return;
            }
        }
    });
    let port = free_port();
    let fwd = format!("127.0.0.1:{port}={upstream}");
    let backstop = format!("AMBASSADOR_SOCKMAP_BACKSTOP={BACKSTOP}");
    let bin = Bin::start(
        &["env", &backstop],
        &["--mode", "sockmap", "--splice", "always", "--forward", &fwd],
        false,
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let rounds = request_response_rounds(&mut s, (21, 22), ROUNDS, MSG);
    drop(s);
    bin.wait_relays_end(port, upstream);
    let (code, log) = bin.stop();
    assert_eq!(rounds, ROUNDS, "the connection was cut: {log}");
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(stat(&log, "integrity_resets"), 0, "{log}");
    let n = ROUNDS * MSG as u64;
    assert_eq!(stat(&log, "spliced_to_upstream"), n, "{log}");
    assert_eq!(stat(&log, "spliced_to_client"), n, "{log}");
    assert_eq!(stat(&log, "bytes_to_upstream"), 0, "{log}");
    assert_eq!(stat(&log, "bytes_to_client"), 0, "{log}");
}

/// An idle spliced connection rests: it stops ticking (no conservation
/// check runs while nothing moves), and the kernel program wakes it when
/// bytes move again. The proof that the wake comes from the kernel: after
/// the rest, request/response traffic carries twice the program's budget
/// (`AMBASSADOR_SOCKMAP_BACKSTOP`, 32 MiB) in the kernel. Only a driver
/// that is awake rolls the budget; one still resting (its safety tick is
/// 30 s) would let the program pass bytes at 32 MiB, and the connection
/// would stall and be reset. The FIN at the end reaches a connection that
/// rests again (the watcher's RDHUP wakes it).
#[test]
fn idle_spliced_connection_rests_until_the_kernel_wakes_it() {
    const MSG: usize = 64 << 10;
    const BACKSTOP: u64 = 32 * MIB;
    const ROUNDS: u64 = 2 * BACKSTOP / MSG as u64;
    let upstream = server(|mut s| {
        let mut b = vec![0u8; MSG];
        while s.read_exact(&mut b).is_ok() {
            if s.write_all(&b).is_err() {
                return;
            }
        }
        // EOF from the client (its FIN came through): answer with ours.
        let _ = s.shutdown(Shutdown::Write);
    });
    let port = free_port();
    let fwd = format!("127.0.0.1:{port}={upstream}");
    let backstop = format!("AMBASSADOR_SOCKMAP_BACKSTOP={BACKSTOP}");
    let bin = Bin::start(
        &["env", &backstop],
        &["--mode", "sockmap", "--splice", "always", "--forward", &fwd],
        false,
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    echo_rounds(&mut s, 31, 1, MSG);
    let rests = |st: &str| stat_in(st, "spliced_rests").unwrap();
    let line = poll(
        Duration::from_secs(10),
        "the idle connection to rest",
        || {
            let st = bin.stats_now();
            (rests(&st) == 1).then_some(st)
        },
    )
    .unwrap();
    let checks = stat_in(&line, "splice_checks").unwrap();
    // Nothing moves, so a resting connection never ticks: an awake one
    // checks at least every 500 ms, so 2 s would show four.
    let ticked = wait_until(Duration::from_secs(2), || {
        stat_in(&bin.stats_now(), "splice_checks").unwrap() != checks
    });
    assert!(!ticked, "a resting connection ran its checks");
    let rounds = 1 + request_response_rounds(&mut s, (32, 32), ROUNDS - 1, MSG);
    assert_eq!(
        rounds,
        ROUNDS,
        "the connection was cut: {}",
        bin.stats_now()
    );
    until(
        Duration::from_secs(10),
        "the connection to rest again",
        || rests(&bin.stats_now()) == 2,
    );
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        s.read(&mut [0u8; 1]).unwrap(),
        0,
        "the upstream's FIN came back"
    );
    drop(s);
    bin.wait_relays_end(port, upstream);
    let (code, log) = bin.stop();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(stat(&log, "integrity_resets"), 0, "{log}");
    assert!(stat(&log, "spliced_wakes") >= 1, "{log}");
    let n = ROUNDS * MSG as u64;
    assert_eq!(stat(&log, "spliced_to_upstream"), n, "{log}");
    assert_eq!(stat(&log, "spliced_to_client"), n, "{log}");
    assert_eq!(stat(&log, "bytes_to_upstream"), 0, "{log}");
    assert_eq!(stat(&log, "bytes_to_client"), 0, "{log}");
}

/// A destination that stops reading costs no polling: the client writes
/// until the proxy stops taking bytes (the connection left the kernel and
/// waits for the upstream to drain what was redirected to it), the driver
/// then waits for the events that end the stall (`spliced_stalls`), and
/// over the next 2 s it runs at most one check (it ticked every 100 ms
/// there before, and every 2 ms before that). Then the upstream reads:
/// every byte arrives, in order, and the connection closes cleanly.
#[test]
fn stalled_destination_costs_no_polling_and_resumes_byte_exact() {
    stalled_destination(&[], None, false);
}

/// The same after the upstream's FIN: an RDHUP already seen must not come
/// back as a wake-up each time the stall's interests change.
#[test]
fn stalled_destination_after_its_fin_costs_no_polling() {
    stalled_destination(&[], None, true);
}

/// The same stall inside the kernel: with an in-flight cap above what the
/// client sends, the connection stays spliced while 16 MiB wait in the
/// psock for an upstream that does not read. It waits for the upstream
/// socket's events, not a tick, and when the upstream reads the kernel
/// carries every byte (nothing was copied in userspace).
#[test]
fn stalled_spliced_destination_waits_for_events_and_resumes_byte_exact() {
    let env = [
        "env",
        "AMBASSADOR_SOCKMAP_INFLIGHT=268435456",
        "AMBASSADOR_SOCKMAP_BACKSTOP=536870912",
    ];
    stalled_destination(&env, Some(16 * MIB), false);
}

/// See the tests above: `wrapper` runs the proxy (environment), `limit`
/// bounds what the client sends (`None`: until the proxy stops taking bytes
/// for 1 s, at most 64 MiB), and with `upstream_fin` the upstream shuts its
/// write side at once (the client sees EOF before it starts writing).
fn stalled_destination(wrapper: &[&str], limit: Option<u64>, upstream_fin: bool) {
    const MAX: u64 = 64 * MIB;
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let (got_tx, got_rx) = std::sync::mpsc::channel();
    let got_tx = Mutex::new(got_tx);
    let (fin_tx, fin_rx) = std::sync::mpsc::channel::<()>();
    let fin_rx = Mutex::new(fin_rx);
    let upstream = server(move |mut s| {
        if upstream_fin {
            if fin_rx.lock().unwrap().recv().is_err() {
                return;
            }
            s.shutdown(Shutdown::Write).unwrap();
        }
        if go_rx.lock().unwrap().recv().is_err() {
            return;
        }
        let r = recv_stream(&mut s, 41);
        let _ = got_tx.lock().unwrap().send(r.map_err(|e| e.to_string()));
    });
    let port = free_port();
    let fwd = format!("127.0.0.1:{port}={upstream}");
    let bin = Bin::start(
        wrapper,
        &["--mode", "sockmap", "--splice", "always", "--forward", &fwd],
        false,
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let stat_now = |k: &str| stat_in(&bin.stats_now(), k).unwrap();
    if upstream_fin {
        // Once the connection is spliced (a half-closed one would not be).
        let spliced = wait_until(Duration::from_secs(10), || stat_now("splice_checks") >= 1);
        assert!(spliced, "not spliced within 10 s: {}", bin.stats_now());
        fin_tx.send(()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0, "the upstream's FIN");
    }
    s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut out = Prng::new(41);
    let mut chunk = vec![0u8; 64 << 10];
    let mut sent = 0u64;
    let mut pending = 0;
    while sent < limit.unwrap_or(MAX) {
        if pending == 0 {
            out.fill(&mut chunk);
            pending = chunk.len();
        }
        match s.write(&chunk[chunk.len() - pending..]) {
            Ok(n) => {
                pending -= n;
                sent += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    match limit {
        None => assert!(sent < MAX, "the proxy took {MAX} bytes without a reader"),
        Some(n) => assert!(sent >= n, "the proxy stopped taking bytes at {sent}"),
    }
    let stalled = wait_until(Duration::from_secs(10), || stat_now("spliced_stalls") >= 1);
    assert!(stalled, "no stall wait within 10 s: {}", bin.stats_now());
    let c0 = stat_now("splice_checks");
    let polled = wait_until(Duration::from_secs(2), || {
        stat_now("splice_checks") - c0 > 1
    });
    assert!(
        !polled,
        "more than 1 check in 2 s while stalled: {}",
        bin.stats_now()
    );
    go_tx.send(()).unwrap();
    s.set_write_timeout(None).unwrap();
    s.write_all(&chunk[chunk.len() - pending..]).unwrap();
    sent += pending as u64;
    s.shutdown(Shutdown::Write).unwrap();
    // Well inside the 30 s safety tick: the stall's events woke the driver.
    let got = got_rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(got, Ok(sent), "the upstream got the stream exactly");
    drop(s);
    bin.wait_relays_end(port, upstream);
    let (code, log) = bin.stop();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(stat(&log, "integrity_resets"), 0, "{log}");
    if limit.is_some() {
        assert_eq!(
            stat(&log, "bytes_to_upstream"),
            0,
            "stayed in the kernel: {log}"
        );
        assert_eq!(stat(&log, "spliced_to_upstream"), sent, "{log}");
    }
}

/// Up to `rounds` round trips of `msg` bytes: the stream from seed `up` goes
/// out, the stream from seed `down` must come back, every byte checked.
/// Returns the round trips completed before the connection was cut (a
/// write or read error), so the caller's assertion can show the log.
fn request_response_rounds(
    s: &mut TcpStream,
    (up, down): (u64, u64),
    rounds: u64,
    msg: usize,
) -> u64 {
    let (mut out, mut back) = (Prng::new(up), Prng::new(down));
    let (mut b, mut want) = (vec![0u8; msg], vec![0u8; msg]);
    for done in 0..rounds {
        out.fill(&mut b);
        if s.write_all(&b).is_err() || s.read_exact(&mut b).is_err() {
            return done;
        }
        back.fill(&mut want);
        assert!(b == want, "pong {done} differs from what was sent");
    }
    rounds
}

/// `rounds` round trips of `chunk` bytes each through an echo upstream,
/// every byte checked: a deterministic stream from `seed` out, the same
/// stream back.
fn echo_rounds(s: &mut TcpStream, seed: u64, rounds: usize, chunk: usize) {
    let (mut out, mut back) = (Prng::new(seed), Prng::new(seed));
    let (mut b, mut want) = (vec![0u8; chunk], vec![0u8; chunk]);
    for r in 0..rounds {
        out.fill(&mut b);
        s.write_all(&b).unwrap();
        s.read_exact(&mut b).unwrap();
        back.fill(&mut want);
        assert!(b == want, "round {r} of stream {seed} differs");
    }
}

/// A full sockmap through the real binary (`AMBASSADOR_SOCKMAP_CONNS=1`):
/// with connection A spliced and still open, connection B does not fit.
/// B is copied in userspace instead, with one warning, and both carry
/// their bytes exactly; the stats count one fallback, no integrity reset,
/// A's bytes as spliced and B's as copied.
#[test]
fn binary_full_sockmap_copies_the_next_connection_in_userspace() {
    const CHUNK: usize = 8 << 10;
    const ROUNDS: usize = 4;
    let upstream = server(|mut s| {
        let mut b = [0u8; 4096];
        loop {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let port = free_port();
    let fwd = format!("127.0.0.1:{port}={upstream}");
    let bin = Bin::start(
        &["env", "AMBASSADOR_SOCKMAP_CONNS=1"],
        &["--mode", "sockmap", "--splice", "always", "--forward", &fwd],
        false,
    );
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    };
    // A fills the map (its round trips are through its splice).
    let mut a = connect();
    echo_rounds(&mut a, 31, ROUNDS, CHUNK);
    // B finds it full while A is open.
    let mut b = connect();
    echo_rounds(&mut b, 32, ROUNDS, CHUNK);
    // A is unharmed by B.
    echo_rounds(&mut a, 33, ROUNDS, CHUNK);
    drop((a, b));
    bin.wait_relays_end(port, upstream);
    let (code, log) = bin.stop();
    assert_eq!(code, Some(0), "{log}");
    let full: Vec<&str> = log.lines().filter(|l| l.contains("sockmap full")).collect();
    assert_eq!(full.len(), 1, "one warning, for B: {log}");
    assert!(full[0].contains("WARN"), "{}", full[0]);
    assert!(
        full[0].contains("sockmap full, copying this connection in userspace"),
        "{}",
        full[0]
    );
    assert!(full[0].contains("capacity=1"), "{}", full[0]);
    assert_eq!(stat(&log, "splice_fallbacks"), 1, "{log}");
    assert_eq!(stat(&log, "integrity_resets"), 0, "{log}");
    assert_eq!(stat(&log, "errors"), 0, "{log}");
    let each = (ROUNDS * CHUNK) as u64;
    assert_eq!(stat(&log, "spliced_to_upstream"), 2 * each, "A: {log}");
    assert_eq!(stat(&log, "spliced_to_client"), 2 * each, "A: {log}");
    assert_eq!(stat(&log, "bytes_to_upstream"), each, "B: {log}");
    assert_eq!(stat(&log, "bytes_to_client"), each, "B: {log}");
}

/// A tuning variable that is not a number is bad input: one line naming
/// it, exit 2, in `--mode sockmap` and in `--mode auto` alike.
#[test]
fn bad_sockmap_tuning_variable_exits_2_naming_it() {
    let port = free_port();
    let fwd = format!("127.0.0.1:{port}=127.0.0.1:9");
    for mode in ["sockmap", "auto"] {
        for var in [
            "AMBASSADOR_SOCKMAP_CONNS=lots",
            "AMBASSADOR_SOCKMAP_BACKSTOP=2G",
            "AMBASSADOR_SOCKMAP_INFLIGHT=-1",
        ] {
            let out = Command::new(env!("CARGO_BIN_EXE_ambassador"))
                .args(["--mode", mode, "--forward", &fwd])
                .env(
                    var.split('=').next().unwrap(),
                    var.split_once('=').unwrap().1,
                )
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "--mode {mode} {var}: {err}");
            let name = var.split('=').next().unwrap();
            assert_eq!(err.lines().count(), 1, "--mode {mode} {var}: {err}");
            assert!(err.contains(name), "--mode {mode} {var}: {err}");
        }
    }
}
