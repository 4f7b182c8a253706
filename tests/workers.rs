//! `--workers N`: several event loops in one process, shown against the
//! real binary on loopback. Every worker accepts from the forward's one
//! listening socket, so with two workers both serve (the `workers` log
//! line counts each worker's connections), every byte still arrives
//! exactly, and `--max-conns` stays one limit for the whole forward, not
//! one per worker. The sockmap engine runs one worker and says so.

mod support;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::process::Command;
use std::sync::atomic::Ordering::SeqCst;
use std::thread;
use std::time::Duration;
use support::*;

/// The numbers of the last `workers` line's `key=` list (`worker_conns=3,4`).
fn worker_list(p: &Proxy, key: &str) -> Option<Vec<u64>> {
    let log = p.log();
    let line = log.lines().rev().find(|l| l.contains(" workers "))?;
    let pat = format!(" {key}=");
    let rest = &line[line.find(&pat)? + pat.len()..];
    let list = rest.split_whitespace().next()?;
    list.split(',').map(|n| n.parse().ok()).collect()
}

/// 40 clients one after the other, 64 KiB each way, checked byte for byte,
/// through one `--max-conns` slot: the two workers' accept loops take
/// turns at it (tokio's semaphore is first come first served, and both
/// loops wait on it before `ready`), so each worker accepts every other
/// client: exactly half of them each. The forward's byte counters add up.
fn both_workers_serve(mode: &str) {
    const CLIENTS: u64 = 40;
    const N: u64 = 64 << 10;
    let echo = echo_server();
    let args = ["--workers", "2", "--max-conns", "1"];
    let p = Proxy::forward(mode, &format!("127.0.0.1:{echo}"), &args);
    assert!(p.wait_line(&["ready", "workers=2"], 5), "{}", p.log());
    for i in 0..CLIENTS {
        let c = p.connect();
        let mut r = c.try_clone().unwrap();
        let check = thread::spawn(move || check_stream(&mut r, i, N));
        let mut w = c;
        send_stream(&mut w, i, N).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
        assert_eq!(check.join().unwrap(), Ok(N), "client {i}\n{}", p.log());
    }
    // The last connection's counters land when its task ends.
    assert!(
        wait_until(10, || {
            p.stats_now()
                && p.stat("conns_active") == Some(0)
                && p.stat("conns_total") == Some(CLIENTS)
        }),
        "{}",
        p.log()
    );
    let conns = worker_list(&p, "worker_conns").expect("a workers line");
    assert_eq!(conns, [CLIENTS / 2, CLIENTS / 2], "{}", p.log());
    assert_eq!(p.stat("bytes_to_upstream"), Some(CLIENTS * N));
    assert_eq!(p.stat("bytes_to_client"), Some(CLIENTS * N));
    assert_eq!(p.stat("errors"), Some(0));
}

/// `--workers 2 --max-conns 2`: two connections are live, the next three
/// wait in the backlog (not one more per worker), and each freed slot
/// admits exactly one of them.
fn limit_is_global(mode: &str) {
    let (port, accepted) = serve(|mut s| {
        let mut b = [0u8; 1];
        let _ = s.read(&mut b);
    });
    let target = format!("127.0.0.1:{port}");
    let p = Proxy::forward(mode, &target, &["--workers", "2", "--max-conns", "2"]);
    let mut clients: Vec<_> = (0..5).map(|_| p.connect()).collect();
    assert!(wait_until(5, || accepted.load(SeqCst) >= 2), "{}", p.log());
    // Not a synchronisation: no event says "the proxy did not accept"; this
    // is the time a wrong accept gets to show before the check below.
    thread::sleep(Duration::from_millis(500));
    assert_eq!(accepted.load(SeqCst), 2, "two slots for both workers");
    for admitted in 3..=5 {
        // Closing a live client frees its slot: one more gets through.
        let c = clients.remove(0);
        c.shutdown(Shutdown::Both).unwrap();
        drop(c);
        assert!(
            wait_until(5, || accepted.load(SeqCst) >= admitted),
            "{}",
            p.log()
        );
        // As above: the time an extra admission gets to show.
        thread::sleep(Duration::from_millis(300));
        assert_eq!(accepted.load(SeqCst), admitted, "{}", p.log());
    }
    // Live again: the two still open were the last admitted.
    for c in &mut clients {
        c.write_all(b"x").unwrap();
    }
}

/// A forced stop (a second SIGTERM during the drain) exits at once and
/// still cuts every live connection with a reset, whichever worker it is
/// on: clients are opened (at most 64) until both workers hold one, then
/// each must read a reset, not a clean end of stream.
fn a_forced_stop_resets_every_workers_connections(mode: &str) {
    let echo = echo_server();
    let args = ["--workers", "2", "--drain-timeout", "10m"];
    let mut p = Proxy::forward(mode, &format!("127.0.0.1:{echo}"), &args);
    let mut clients = Vec::new();
    let mut both = false;
    while !both && clients.len() < 64 {
        let mut c = p.connect();
        c.write_all(b"live").unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"live");
        clients.push(c);
        assert!(p.stats_now(), "{}", p.log());
        let active = worker_list(&p, "worker_active").expect("a workers line");
        both = active.iter().all(|&n| n > 0);
    }
    assert!(
        both,
        "{mode}: one worker took all {} clients: {}",
        clients.len(),
        p.log()
    );
    p.signal(libc::SIGTERM);
    assert!(p.wait_log("draining", 10), "{}", p.log());
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(20), Some(1), "{mode}: {}", p.log());
    for (i, c) in clients.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut rest = Vec::new();
        let r = c.read_to_end(&mut rest);
        assert_eq!(
            r.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset),
            "{mode}: client {i} of {}: a cut stream must not look finished",
            clients.len()
        );
    }
}

#[test]
fn epoll_a_forced_stop_resets_every_workers_connections() {
    a_forced_stop_resets_every_workers_connections("epoll")
}

#[test]
fn uring_a_forced_stop_resets_every_workers_connections() {
    a_forced_stop_resets_every_workers_connections("uring")
}

#[test]
fn epoll_both_workers_serve() {
    both_workers_serve("epoll")
}

#[test]
fn uring_both_workers_serve() {
    both_workers_serve("uring")
}

#[test]
fn epoll_limit_is_global() {
    limit_is_global("epoll")
}

#[test]
fn uring_limit_is_global() {
    limit_is_global("uring")
}

/// `auto` (the default) counts the CPUs in the affinity mask: pinned to
/// one CPU, the process runs one worker.
#[test]
fn auto_honours_the_affinity_mask() {
    use std::os::unix::process::CommandExt;
    let echo = echo_server();
    let port = free_port();
    let mut cmd = Command::new(BIN);
    cmd.env_clear().args([
        "--mode",
        "epoll",
        "--forward",
        &format!("127.0.0.1:{port}=127.0.0.1:{echo}"),
    ]);
    // Safety: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let p = Proxy::spawn(cmd, port).expect("ready");
    assert!(p.wait_line(&["ready", "workers=1"], 5), "{}", p.log());
}

/// The sockmap engine runs one worker and says why.
#[test]
fn sockmap_runs_one_worker_and_says_so() {
    let echo = echo_server();
    let p = Proxy::forward("sockmap", &format!("127.0.0.1:{echo}"), &["--workers", "2"]);
    assert!(p.wait_line(&["ready", "workers=1"], 5), "{}", p.log());
    assert!(p.log().contains("sockmap: 1 worker ("), "{}", p.log());
}

/// A bad count is one line naming the flag (or variable), exit 2.
#[test]
fn bad_worker_counts_are_one_line_errors() {
    for (args, env, needle) in [
        (vec!["--workers", "0"], None, "--workers: 0 is out of range"),
        (vec!["--workers", "lots"], None, "--workers: \"lots\""),
        (vec![], Some("none"), "--workers: \"none\""),
    ] {
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .args(["--check", "--forward", "7000=127.0.0.1:1"])
            .args(&args);
        if let Some(v) = env {
            cmd.env("AMBASSADOR_WORKERS", v);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
