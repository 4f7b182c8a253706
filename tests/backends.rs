//! Several backends per forward, against real redis-servers: round robin
//! spreads clients, a dead backend is skipped (retry, then ejection), and
//! with every backend dead a client is closed at once with one warning.

#[path = "support/redis.rs"]
mod redis;
mod support;

use redis::{Redis, command, connect, server_port, try_command};
use std::io::Read;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use support::*;

fn proxy(backends: &[&Redis], extra: &[&str]) -> Proxy {
    proxy_on("epoll", backends, extra)
}

fn proxy_on(mode: &str, backends: &[&Redis], extra: &[&str]) -> Proxy {
    let list: Vec<String> = backends.iter().map(|r| r.addr()).collect();
    Proxy::forward(mode, &list.join(","), extra)
}

/// A client through the proxy that gets an answer from some redis.
fn ping(p: &Proxy) -> std::net::TcpStream {
    let mut c = connect(&p.addr());
    assert_eq!(command(&mut c, &["PING"]), "+PONG");
    c
}

#[test]
fn round_robin_spreads_connections_over_both_redis() {
    let (r1, r2) = (Redis::start(), Redis::start());
    let p = proxy(&[&r1, &r2], &[]);
    // Ten clients held open, one after the other: five on each backend.
    let held: Vec<_> = (0..10).map(|_| ping(&p)).collect();
    // connected_clients counts the INFO connection itself too.
    assert_eq!(r1.info("clients", "connected_clients"), 6, "{}", p.log());
    assert_eq!(r2.info("clients", "connected_clients"), 6, "{}", p.log());
    drop(held);
    let log = p.log();
    let listening = log.lines().find(|l| l.contains("listening")).unwrap();
    assert!(
        listening.contains(&format!("target={},{}", r1.addr(), r2.addr())),
        "{listening}"
    );
}

#[test]
fn least_conn_sends_new_clients_to_the_less_busy_redis() {
    let (r1, r2) = (Redis::start(), Redis::start());
    let p = proxy(&[&r1, &r2], &["--balance", "least-conn"]);
    // Two clients: one each. Close the one on r1 (first in order), then
    // three more clients: the first goes to idle r1, then they alternate.
    let a = ping(&p);
    let _b = ping(&p);
    drop(a);
    // Wait for the proxy to see the close (r1 back to only our INFO client).
    ambassador_test_support::until(
        std::time::Duration::from_secs(10),
        "the close to reach r1",
        || r1.info("clients", "connected_clients") == 1,
    );
    assert!(wait_until(10, || p
        .log()
        .matches("connection closed")
        .count()
        >= 1));
    let _more: Vec<_> = (0..3).map(|_| ping(&p)).collect();
    // r1: 2 of the 3 new ones; r2: the old one and 1 new one (+ INFO each).
    assert_eq!(r1.info("clients", "connected_clients"), 3, "{}", p.log());
    assert_eq!(r2.info("clients", "connected_clients"), 3, "{}", p.log());
}

#[test]
fn a_redis_killed_under_load_fails_only_its_clients() {
    killed_redis("epoll")
}

/// The engines never see the choice: the same through io_uring and the
/// in-kernel splice.
#[test]
fn a_redis_killed_under_load_fails_only_its_clients_uring() {
    killed_redis("uring")
}

#[test]
fn a_redis_killed_under_load_fails_only_its_clients_sockmap() {
    killed_redis("sockmap")
}

/// r1 is killed while 8 clients (4 on each redis) are busy: only r1's
/// clients fail; r2's go on; every new client reaches r2 (a refused connect
/// is retried, then r1 is ejected), and a redis-benchmark afterwards sees no
/// error.
fn killed_redis(mode: &str) {
    let (mut r1, r2) = (Redis::start(), Redis::start());
    let p = proxy_on(mode, &[&r1, &r2], &[]);
    let (on_r1, on_r2): (Vec<_>, Vec<_>) = (0..8)
        .map(|_| {
            let mut c = ping(&p);
            let port = server_port(&mut c);
            (c, port)
        })
        .partition(|(_, port)| *port == r1.port);
    assert_eq!((on_r1.len(), on_r2.len()), (4, 4), "round robin");

    // Load on r2's clients until told to stop; every reply must be PONG.
    let rounds = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (rounds, stop) = (rounds.clone(), stop.clone());
        let mut conns: Vec<_> = on_r2.into_iter().map(|(c, _)| c).collect();
        std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                for c in &mut conns {
                    assert_eq!(command(c, &["PING"]), "+PONG");
                }
                rounds.fetch_add(1, Relaxed);
            }
        })
    };
    assert!(wait_until(10, || rounds.load(Relaxed) >= 10));
    r1.kill();
    let at_kill = rounds.load(Relaxed);
    for (mut c, _) in on_r1 {
        let r = try_command(&mut c, &["PING"]);
        assert!(r.is_err(), "a client of the killed redis got {r:?}");
    }

    // Every new client still gets an answer: a refused connect is retried
    // on the other backend before any byte was sent.
    let held: Vec<_> = (0..20).map(|_| ping(&p)).collect();
    // The 20 held clients, the 4 loaded ones (and INFO's own), once the
    // earlier short clients' closes have reached r2.
    assert!(
        wait_until(10, || r2.info("clients", "connected_clients") == 25),
        "all 20 new clients on r2: {}",
        p.log()
    );
    // r2's busy clients went on through the kill.
    assert!(wait_until(10, || rounds.load(Relaxed) >= at_kill + 50));
    stop.store(true, Relaxed);
    load.join().expect("r2's clients lost no reply");
    drop(held);

    let bench = Command::new("redis-benchmark")
        .args(["-p", &p.port.to_string(), "-n", "20000", "-c", "8", "-q"])
        .args(["-t", "set,get"])
        .output()
        .expect("redis-benchmark");
    let text = String::from_utf8_lossy(&bench.stdout).replace('\r', "\n");
    assert!(bench.status.success(), "{text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("GET: ")), "{text}");

    let log = p.log();
    let down: Vec<&str> = log.lines().filter(|l| l.contains("backend down")).collect();
    assert_eq!(down.len(), 1, "ejected once: {log}");
    assert!(
        down[0].contains(&format!("backend={}", r1.addr())),
        "{}",
        down[0]
    );
    assert!(down[0].contains("WARN"), "{}", down[0]);
    // After the ejection the dead backend is not even tried: 3 failed
    // connects (the threshold), not one per client.
    let retries = log
        .lines()
        .filter(|l| l.contains("trying the next backend"))
        .count();
    assert_eq!(retries, 3, "{log}");
    assert!(
        !log.contains("upstream connect failed"),
        "no client failed: {log}"
    );
}

#[test]
fn every_backend_dead_closes_the_client_at_once_with_one_warning() {
    let (mut r1, mut r2) = (Redis::start(), Redis::start());
    let p = proxy(&[&r1, &r2], &[]);
    ping(&p);
    r1.kill();
    r2.kill();
    // Before and after both are ejected (3 clients × 2 failed connects =
    // 3 failures each): every client is closed, none is left hanging.
    for _ in 0..5 {
        let mut c = p.connect();
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let me = format!("client={} ", c.local_addr().unwrap());
        let mut b = [0u8; 1];
        let r = c.read(&mut b);
        assert!(
            matches!(&r, Ok(0))
                || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "closed, not hanging: {r:?}"
        );
        // The log arrives through a pipe: wait for this client's warning
        // itself (an INFO line about it can come first), then count.
        let warnings = |log: &str| {
            log.lines()
                .filter(|l| l.contains(&me) && l.contains("WARN"))
                .count()
        };
        assert!(wait_until(5, || warnings(&p.log()) > 0), "{}", p.log());
        let log = p.log();
        assert_eq!(warnings(&log), 1, "one warning per client: {log}");
    }
    let log = p.log();
    assert_eq!(log.matches("backend down").count(), 2, "{log}");
    assert!(log.contains("no healthy backend"), "{log}");
}

#[test]
fn check_prints_every_backend_and_bad_lists_are_one_line() {
    let out = Command::new(BIN)
        .env_clear()
        .args([
            "--check",
            "--forward",
            "7000=db1:6379,db2:6379",
            "--balance",
            "least-conn",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("db1:6379,db2:6379"), "{text}");
    assert!(text.contains("least-conn"), "{text}");
    for (args, needle) in [
        (
            &["--forward", "7000=db1:6379,db1:6379"][..],
            "--forward 7000=db1:6379,db1:6379: ",
        ),
        (
            &["--forward", "7000=db1:6379,"][..],
            "--forward 7000=db1:6379,: ",
        ),
        (
            &["--forward", "7000=db:1", "--health-fails", "0"][..],
            "--health-fails: ",
        ),
    ] {
        let out = Command::new(BIN).env_clear().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
}
