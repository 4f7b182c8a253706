//! Live reload (SIGHUP and config-file changes) against real redis-servers
//! and PostgreSQL: forwards added, changed and removed while redis-benchmark
//! and pgbench run through them with no error, per engine; a removed forward stops accepting while its
//! connection keeps working; a config that fails to parse or to bind is
//! rejected whole and the old one keeps serving; without a config file
//! SIGHUP only logs.

#[path = "support/redis.rs"]
mod redis;
mod support;
mod support_docker;

use redis::{Redis, command, connect};
use std::net::{Ipv4Addr, TcpStream};
use std::process::Command;
use support::*;
use support_docker::postgres::{Postgres, pg_tool, pgbench, psql};

/// A config file in a directory of its own (removed with it when the test
/// is done).
struct ConfigFile {
    dir: std::path::PathBuf,
    path: String,
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl ConfigFile {
    fn new(name: &str) -> ConfigFile {
        let dir = std::env::temp_dir().join(format!("amb-reload-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        ConfigFile {
            path: dir.join("amb.toml").to_string_lossy().into_owned(),
            dir,
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
    start_on("epoll", cfg, port)
}

/// The proxy on `mode` (`sockmap`: every connection spliced in the kernel).
fn start_on(mode: &str, cfg: &ConfigFile, port: u16) -> Proxy {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .args(["--mode", mode, "--config", &cfg.path]);
    if mode == "sockmap" {
        cmd.args(["--splice", "always"]);
    }
    Proxy::spawn(cmd, port).expect("ambassador ready")
}

fn ping(port: u16) -> TcpStream {
    let mut c = connect(&format!("127.0.0.1:{port}"));
    assert_eq!(command(&mut c, &["PING"]), "+PONG");
    c
}

/// Wait for the `n`-th occurrence of `needle` in the log.
fn wait_count(p: &Proxy, needle: &str, n: usize) -> bool {
    wait_until(15, || p.log().matches(needle).count() >= n)
}

/// Per engine: the reloads below happen while redis-benchmark and pgbench
/// run through the proxy. pgbench keeps its 4 connections for the whole run,
/// so they are established connections across every reload — spliced in the
/// kernel with `sockmap` (`--splice always`).
#[test]
fn reload_under_load_loses_nothing_epoll() {
    reload_under_load("epoll")
}

#[test]
fn reload_under_load_loses_nothing_uring() {
    reload_under_load("uring")
}

#[test]
fn reload_under_load_loses_nothing_sockmap() {
    reload_under_load("sockmap")
}

/// redis-benchmark on forward A, pgbench on forward P; meanwhile: by a file
/// change A gets a second backend, P changes its balancing and forward B is
/// added; by SIGHUP B is removed while a client of B is still connected.
/// Nothing fails, no transaction is lost, and pgbench's own connections
/// carried transactions after the last reload.
fn reload_under_load(mode: &str) {
    let (r1, r2) = (Redis::start(), Redis::start());
    let pg = Postgres::start(None, Ipv4Addr::LOCALHOST, free_port(), None);
    let pg_addr = format!("127.0.0.1:{}", pg.port);
    pgbench_init(&pg_addr);
    let (a, b, pp) = (free_port(), free_port(), free_port());
    let pg_forward = |extra: &str| {
        format!(
            "[[forward]]\nname = \"pg\"\nlisten = \"127.0.0.1:{pp}\"\nbackends = [\"{pg_addr}\"]\n{extra}"
        )
    };
    let cfg = ConfigFile::new(&format!("load-{mode}"));
    cfg.write(&format!("{}{}", forward(a, &[&r1]), pg_forward("")));
    let p = start_on(mode, &cfg, a);

    let redis_bench = std::thread::spawn(move || {
        Command::new("redis-benchmark")
            .args(["-p", &a.to_string(), "-n", "60000", "-c", "10", "-q"])
            .args(["-t", "set,get,incr"])
            .output()
            .expect("redis-benchmark")
    });
    // 4 clients × 1500 transactions: several seconds, far longer than the
    // reloads (the test checks that it really overlapped them).
    let pg_bench = std::thread::spawn(move || {
        pgbench(None, "127.0.0.1", pp, &["-c", "4", "-j", "2", "-t", "1500"])
    });
    // Wait until both benchmarks' clients are through the forwards.
    assert!(
        wait_until(30, || r1.info("clients", "connected_clients") > 5),
        "{}",
        p.log()
    );
    assert!(wait_until(30, || pg_clients(&pg_addr) == 4), "{}", p.log());

    // 1. By a file change.
    cfg.write(&format!(
        "{}{}{}",
        forward(a, &[&r1, &r2]),
        pg_forward("balance = \"least-conn\"\n"),
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
    cfg.write(&format!(
        "{}{}",
        forward(a, &[&r1, &r2]),
        pg_forward("balance = \"least-conn\"\n")
    ));
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
    let tx_at_reload = history_rows(&pg_addr);

    let out = redis_bench.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}{err}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
    assert!(!err.to_lowercase().contains("error"), "{err}");
    for op in ["SET: ", "GET: ", "INCR: "] {
        assert!(text.lines().any(|l| l.starts_with(op)), "{op} in {text}");
    }
    // pgbench checks itself that all 6000 transactions completed.
    let tps = pg_bench.join().unwrap();
    let tx_total = history_rows(&pg_addr);
    assert_eq!(tx_total, 6000, "{}", p.log());
    assert!(
        tx_at_reload < tx_total,
        "pgbench ended before the reloads ({tx_at_reload} of {tx_total} transactions), so they \
         were not tested under load"
    );
    eprintln!(
        "{mode}: pgbench {tps:.0} tps, {tx_at_reload}/{tx_total} transactions before the last reload"
    );
    drop((held_a, held_b));
    if mode == "sockmap" {
        // The kernel really carried pgbench's connections across the reloads.
        p.signal(libc::SIGUSR1);
        let source = format!("{}[pg]", cfg.path);
        let want = format!("forward={source} ");
        assert!(p.wait_line(&[" stats ", &want], 10), "{}", p.log());
        let spliced = p.stat_for(&source, "spliced_to_upstream");
        assert!(spliced.unwrap_or(0) > 0, "{}", p.log());
    }
    let log = p.log();
    assert!(!log.contains("upstream connect failed"), "{log}");
    assert!(!log.contains("connection error"), "{log}");
    assert!(!log.contains("integrity check failed"), "{log}");
    assert!(!log.contains(" WARN "), "{log}");
    assert!(!log.contains("reload rejected"), "{log}");
}

/// `pgbench -i` directly against the database: fresh tables, empty history.
fn pgbench_init(pg_addr: &str) {
    let (host, port) = pg_addr.split_once(':').unwrap();
    let mut init = pg_tool(None, "pgbench", host, port.parse().unwrap());
    let out = init.args(["-i", "-q", "-s", "1"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pg_sql(pg_addr: &str, sql: &str) -> u64 {
    let (host, port) = pg_addr.split_once(':').unwrap();
    psql(None, host, port.parse().unwrap(), sql)
        .parse()
        .unwrap()
}

/// pgbench's sessions on the server (they came through the proxy).
fn pg_clients(pg_addr: &str) -> u64 {
    pg_sql(
        pg_addr,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbench'",
    )
}

/// Committed pgbench transactions so far (one history row each).
fn history_rows(pg_addr: &str) -> u64 {
    pg_sql(pg_addr, "SELECT count(*) FROM pgbench_history")
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
