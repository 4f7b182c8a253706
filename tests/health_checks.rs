//! Active TCP health checks (`--health-interval`, `--health-rise`,
//! `--health-fall`) against real redis-servers: a killed backend is taken
//! down by the checks alone, before any client tries it; once it listens
//! again, `rise` good checks bring it back and it gets clients again.

#[path = "support/redis.rs"]
mod redis;
mod support;

use redis::{Redis, command, connect};
use support::*;

fn ping(p: &Proxy) -> std::net::TcpStream {
    let mut c = connect(&p.addr());
    assert_eq!(command(&mut c, &["PING"]), "+PONG");
    c
}

#[test]
fn checks_take_a_dead_backend_down_and_bring_it_back() {
    let (mut r1, r2) = (Redis::start(), Redis::start());
    let backends = format!("{},{}", r1.addr(), r2.addr());
    let p = Proxy::forward(
        "epoll",
        &backends,
        &[
            "--health-interval",
            "100ms",
            "--health-rise",
            "2",
            "--health-fall",
            "2",
        ],
    );
    // The checks reach both redis servers (each connect is a client there).
    assert!(wait_until(10, || r1
        .info("stats", "total_connections_received")
        >= 3));
    r1.kill();
    let down = format!("backend={}", r1.addr());
    assert!(p.wait_line(&["backend down", &down], 10), "{}", p.log());
    let log = p.log();
    let line = log.lines().find(|l| l.contains("backend down")).unwrap();
    assert!(line.contains("failed health checks"), "{line}");
    // No client has tried r1: every client goes straight to r2.
    let held: Vec<_> = (0..6).map(|_| ping(&p)).collect();
    assert!(!p.log().contains("trying the next backend"), "{}", p.log());
    drop(held);

    // r1 back on its port: two good checks, then it takes clients again.
    let r1 = Redis::start_on(r1.port);
    assert!(p.wait_line(&["backend up", &down], 10), "{}", p.log());
    let _held: Vec<_> = (0..4).map(|_| ping(&p)).collect();
    assert!(
        r1.info("clients", "connected_clients") >= 3,
        "round robin reaches r1 again: {}",
        p.log()
    );
}

#[test]
fn check_shows_the_active_check_settings() {
    let out = std::process::Command::new(BIN)
        .env_clear()
        .args([
            "--check",
            "--forward",
            "7000=a:1,b:1",
            "--health-interval",
            "2s",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("checked every 2s (rise 2, fall 3)"), "{text}");
    let out = std::process::Command::new(BIN)
        .env_clear()
        .args(["--check", "--forward", "7000=a:1", "--health-rise", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--health-rise: "), "{err}");
}
