//! Live reload (SIGHUP and config-file changes) against real redis-servers:
//! forwards added, changed and removed while redis-benchmark runs through
//! one of them with no error; a removed forward stops accepting while its
//! connection keeps working; a config that fails to parse or to bind is
//! rejected whole and the old one keeps serving; without a config file
//! SIGHUP only logs.

#[path = "support/redis.rs"]
mod redis;
mod support;

use redis::{Redis, command, connect};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

struct ConfigFile {
    path: String,
}

impl ConfigFile {
    fn new(name: &str) -> ConfigFile {
        let dir = std::env::temp_dir().join(format!("amb-reload-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        ConfigFile {
            path: dir.join("amb.toml").to_string_lossy().into_owned(),
        }
    }

    /// Replace the file atomically (write a temporary file, rename it over).
    fn write(&self, text: &str) {
        let tmp = format!("{}.tmp", self.path);
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }
}

fn forward(listen: u16, backends: &[&Redis]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|r| format!("\"{}\"", r.addr()))
        .collect();
    format!(
        "[[forward]]\nlisten = \"127.0.0.1:{listen}\"\nbackends = [{}]\n",
        list.join(", ")
    )
}

fn start(cfg: &ConfigFile, port: u16) -> Proxy {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .args(["--mode", "epoll", "--config", &cfg.path]);
    Proxy::spawn(cmd, port).expect("ambassador ready")
}

fn ping(port: u16) -> TcpStream {
    let mut c = connect(&format!("127.0.0.1:{port}"));
    assert_eq!(command(&mut c, &["PING"]), "+PONG");
    c
}

fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Wait for the `n`-th occurrence of `needle` in the log.
fn wait_count(p: &Proxy, needle: &str, n: usize) -> bool {
    wait_until(15, || p.log().matches(needle).count() >= n)
}

#[test]
fn reload_while_redis_benchmark_runs_loses_nothing() {
    let (r1, r2) = (Redis::start(), Redis::start());
    let (a, b) = (free_port(), free_port());
    let cfg = ConfigFile::new("bench");
    cfg.write(&forward(a, &[&r1]));
    let p = start(&cfg, a);

    let bench = std::thread::spawn(move || {
        Command::new("redis-benchmark")
            .args([
                "-p",
                &a.to_string(),
                "-n",
                "60000",
                "-c",
                "10",
                "-q",
                "-t",
                "set,get,incr",
            ])
            .output()
            .expect("redis-benchmark")
    });
    // Wait until the benchmark's clients are through the forward.
    assert!(
        wait_until(15, || r1.info("clients", "connected_clients") > 5),
        "{}",
        p.log()
    );

    // 1. By a file change: forward A gets a second backend, forward B is added.
    cfg.write(&format!(
        "{}{}",
        forward(a, &[&r1, &r2]),
        forward(b, &[&r2])
    ));
    assert!(wait_count(&p, "reloaded", 1), "{}", p.log());
    let held_b = ping(b);
    // New connections to A now spread over both backends.
    let before = r2.info("stats", "total_connections_received");
    let held_a: Vec<_> = (0..4).map(|_| ping(a)).collect();
    assert!(
        r2.info("stats", "total_connections_received") > before,
        "{}",
        p.log()
    );

    // 2. By SIGHUP: forward B removed. Its listener closes; its live
    // connection keeps working until it ends.
    cfg.write(&forward(a, &[&r1, &r2]));
    // The watcher may reload first; SIGHUP reloads (again) in any case.
    p.signal(libc::SIGHUP);
    assert!(
        wait_until(15, || TcpStream::connect(("127.0.0.1", b)).is_err()),
        "{}",
        p.log()
    );
    let mut held_b = held_b;
    assert_eq!(command(&mut held_b, &["PING"]), "+PONG");
    assert!(p.log().contains("trigger=SIGHUP"), "{}", p.log());
    assert!(p.log().contains("forward removed"), "{}", p.log());

    let out = bench.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}{err}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
    assert!(!err.to_lowercase().contains("error"), "{err}");
    for op in ["SET: ", "GET: ", "INCR: "] {
        assert!(text.lines().any(|l| l.starts_with(op)), "{op} in {text}");
    }
    drop((held_a, held_b));
    let log = p.log();
    assert!(!log.contains("upstream connect failed"), "{log}");
    assert!(!log.contains("connection error"), "{log}");
    assert!(!log.contains("reload rejected"), "{log}");
}

#[test]
fn a_bad_config_is_rejected_whole_and_the_old_one_keeps_serving() {
    let (r1, r2) = (Redis::start(), Redis::start());
    let (a, b) = (free_port(), free_port());
    let cfg = ConfigFile::new("bad");
    cfg.write(&forward(a, &[&r1]));
    let mut p = start(&cfg, a);

    // Parse error: rejected with the file, line and key.
    cfg.write(&format!(
        "{}[[forward]]\nlisten = 70000\nbackends = [\"x:1\"]\n",
        forward(a, &[&r2])
    ));
    p.signal(libc::SIGHUP);
    assert!(wait_count(&p, "reload rejected", 1), "{}", p.log());
    let log = p.log();
    let line = log.lines().find(|l| l.contains("reload rejected")).unwrap();
    assert!(
        line.contains(&format!("{}:5: forward[1].listen", cfg.path)),
        "{line}"
    );
    assert!(line.contains("WARN"), "{line}");

    // Bind error: B's port is taken. Nothing of that config applies: A
    // keeps only r1 (not r2), B is not served by us.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", b)).unwrap();
    cfg.write(&format!("{}{}", forward(a, &[&r2]), forward(b, &[&r2])));
    p.signal(libc::SIGHUP);
    assert!(wait_count(&p, "cannot listen", 1), "{}", p.log());
    let r2_before = r2.info("stats", "total_connections_received");
    let held: Vec<_> = (0..3).map(|_| ping(a)).collect();
    assert_eq!(
        r1.info("clients", "connected_clients"),
        4,
        "A still goes to r1: {}",
        p.log()
    );
    assert_eq!(
        r2.info("stats", "total_connections_received"),
        r2_before + 1,
        "only our INFO reached r2"
    );
    drop((held, squatter));
    assert!(!p.log().contains(" reloaded "), "{}", p.log());

    // The process is fine and still drains cleanly.
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(10), Some(0), "{}", p.log());
}

#[test]
fn sighup_without_a_config_file_only_logs() {
    let r = Redis::start();
    let p = Proxy::forward("epoll", &r.addr(), &[]);
    p.signal(libc::SIGHUP);
    assert!(
        p.wait_log("reload requested: no config file, nothing to reload", 10),
        "{}",
        p.log()
    );
    p.signal(libc::SIGHUP);
    assert!(wait_count(&p, "nothing to reload", 2), "{}", p.log());
    ping(p.port);
}
