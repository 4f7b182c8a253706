//! The two-host walkthrough with etcd discovery and no restarts (issue 13, item 3):
//!
//! ```text
//!   host1 (netns)                              host2 (netns, 10.200.1.2)
//!   app ── 127.0.0.1:6379/5432 ── ambassador1 ──veth── ambassador2 :6379/:5432 ── redis :16379 → :16380
//!          etcd://…/amb2-redis, amb2-pg                 etcd://…/db, pg          postgres :15432 → :15433
//!                                              etcd 10.200.1.2:2379 (in host2)
//! ```
//!
//! Every address is registered with `ambassador register`: the dbs register themselves (`db`,
//! `pg`), ambassador2 registers its two listeners (`amb2-redis`, `amb2-pg`); ambassador1 finds
//! ambassador2 through etcd, ambassador2 finds the dbs. Then the db moves while redis-benchmark
//! (`-k 0`: a new connection per request) and pgbench (`-C`: a new connection per transaction)
//! run through the chain and a loop of fresh connections does PING / `SELECT 1`:
//!
//! 1. the new redis and postgres start (on other ports) and register;
//! 2. the old ones deregister (SIGTERM to their `register`, which revokes the lease);
//! 3. ambassador2 logs the set with only the new db: from then on new connections go there;
//! 4. drain: a redis connection opened before the move (on the old db) still runs its commands
//!    on the old db, then closes; the old dbs are stopped only once they have no client left;
//! 5. the load ends (every loop runs at least once more after the move) with 0 errors; the app
//!    finds a key that exists only in the new redis; both ambassadors have their original pid.
//!
//! Needs root (namespaces). Traffic stays inside the two namespaces the test creates.

#[path = "support/redis.rs"]
mod redis;
mod support;
mod support_docker;

use redis::{command, server_port};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support_docker::netns::{TwoHosts, in_ns};
use support_docker::postgres::{Postgres, TempDir, pg_tool, pgbench, psql};
use support_docker::redis::{redis_cli, redis_server};
use support_docker::{Daemon, ambassador_bin, apt_install, ok, poll, run};

const REDIS_A: u16 = 16379;
const REDIS_B: u16 = 16380;
const PG_A: u16 = 15432;
const PG_B: u16 = 15433;
const ETCD: u16 = 2379;
const START: Duration = Duration::from_secs(30);
const CLIENT: Duration = Duration::from_secs(60);
/// Each load loop runs until the move is over and then once more, at most this many runs.
/// A bound, not a figure: the fresh-connection loop (20 PINGs + one SELECT per run) did 38
/// runs during a 3 s move through two workers per ambassador, so 40 was hit by a faster
/// proxy; 400 runs are still a few minutes at most.
const MAX_RUNS: u32 = 400;
/// redis-benchmark requests per run (per test: SET and GET), 4 clients, a connection each.
const RB_REQUESTS: &str = "1000";
/// pgbench transactions per client per run, 2 clients, a connection each.
const PG_TX: &str = "40";

#[test]
fn the_db_moves_with_no_restart_and_no_error() {
    apt_install(&[
        "redis-server",
        "redis-tools",
        "postgresql",
        "iproute2",
        "util-linux",
        "etcd-server",
        "etcd-client",
    ]);
    let lab = TwoHosts::new();
    let (h1, h2, a2) = (lab.host1.clone(), lab.host2.clone(), lab.addr2);
    let tmp = TempDir::new("amb-dchain-");
    let etcd = etcd(&h2, a2, &tmp.0);
    let etcd_addr = format!("{a2}:{ETCD}");
    let url = |svc: &str| format!("etcd://{etcd_addr}/{svc}");
    let at = |port: u16| format!("{a2}:{port}");

    let redis_a = redis_server(&h2, a2, REDIS_A, &tmp.0);
    let pg_a = Postgres::start(Some(&h2), a2, PG_A, Some("10.200.1.0/24"));
    ok(
        pg_tool(Some(&h2), "pgbench", &a2.to_string(), PG_A).args(["-i", "-q", "-s", "1"]),
        None,
        CLIENT,
    );
    let reg_db_a = register(&h2, &etcd_addr, "db", &at(REDIS_A));
    let reg_pg_a = register(&h2, &etcd_addr, "pg", &at(PG_A));

    let amb2 = ambassador(
        &h2,
        "ambassador2",
        &[("6379", url("db")), ("5432", url("pg"))],
    );
    let _reg_amb2 = [
        register(&h2, &etcd_addr, "amb2-redis", &at(6379)),
        register(&h2, &etcd_addr, "amb2-pg", &at(5432)),
    ];
    let amb1 = ambassador(
        &h1,
        "ambassador1",
        &[
            ("127.0.0.1:6379", url("amb2-redis")),
            ("127.0.0.1:5432", url("amb2-pg")),
        ],
    );
    let pids = (amb1.pid(), amb2.pid());

    // The app reaches the old db through both ambassadors; this connection stays open across
    // the move.
    let mut held = in_ns(&h1, || TcpStream::connect("127.0.0.1:6379").unwrap());
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(server_port(&mut held), REDIS_A);
    assert_eq!(command(&mut held, &["SET", "held", "1"]), "+OK");
    assert_eq!(psql(Some(&h1), "127.0.0.1", 5432, "SELECT 1"), "1");

    // The load, started before the move and running until after it.
    let moved = Arc::new(AtomicBool::new(false));
    let loads = Loads::start(&h1, &moved);
    assert!(
        poll(CLIENT, || (loads.runs() >= 3).then_some(())).is_some(),
        "the load did not get going"
    );

    // 1. The new db starts and registers.
    let t0 = Instant::now();
    let redis_b = redis_server(&h2, a2, REDIS_B, &tmp.0);
    let marker = format!("moved-{}", std::process::id());
    let set = ok(
        redis_cli(&h2, &a2.to_string(), REDIS_B).args(["SET", "only-in-new-db", &marker]),
        None,
        CLIENT,
    );
    assert_eq!(set.stdout_str().trim(), "OK");
    let pg_b = Postgres::start(Some(&h2), a2, PG_B, Some("10.200.1.0/24"));
    ok(
        pg_tool(Some(&h2), "pgbench", &a2.to_string(), PG_B).args(["-i", "-q", "-s", "1"]),
        None,
        CLIENT,
    );
    let _reg_db_b = register(&h2, &etcd_addr, "db", &at(REDIS_B));
    let _reg_pg_b = register(&h2, &etcd_addr, "pg", &at(PG_B));
    wait_log(
        &amb2,
        &format!("backends={},{} count=2", at(REDIS_A), at(REDIS_B)),
    );
    wait_log(
        &amb2,
        &format!("backends={},{} count=2", at(PG_A), at(PG_B)),
    );

    // 2. The old one deregisters; 3. ambassador2 sends new connections to the new db only.
    for reg in [reg_db_a, reg_pg_a] {
        let (status, log) = reg.stop(Duration::from_secs(10));
        assert!(status.success(), "register did not exit 0:\n{log}");
    }
    wait_log(&amb2, &format!("backends={} count=1", at(REDIS_B)));
    wait_log(&amb2, &format!("backends={} count=1", at(PG_B)));
    let deregistered = t0.elapsed();

    // 4. Drain: the connection from before the move is still on the old db and works.
    assert_eq!(server_port(&mut held), REDIS_A, "the held connection moved");
    assert_eq!(command(&mut held, &["GET", "held"]), "1");
    assert_eq!(command(&mut held, &["INCR", "held"]), ":2");
    drop(held);
    // The old dbs stop once no client is left on them (only our own INFO / psql session).
    let drained = poll(CLIENT, || {
        let clients = redis_info(&h2, a2, REDIS_A, "connected_clients");
        let pg = psql(
            Some(&h2),
            &a2.to_string(),
            PG_A,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
        );
        (clients == 1 && pg == "1").then_some(())
    });
    assert!(drained.is_some(), "the old db kept clients");
    drop(redis_a);
    drop(pg_a);
    let move_time = t0.elapsed();
    moved.store(true, Ordering::SeqCst);

    // 5. The load ends with no error; the app is on the new db; nothing was restarted.
    let figures = loads.join();
    assert_eq!(figures.redis_errors, 0, "redis-benchmark errors");
    assert_eq!(figures.fresh_failures, 0, "fresh connections failed");
    let got = ok(
        redis_cli(&h1, "127.0.0.1", 6379).args(["GET", "only-in-new-db"]),
        None,
        CLIENT,
    );
    assert_eq!(
        got.stdout_str().trim(),
        marker,
        "the app is not on the new db"
    );
    assert_eq!(psql(Some(&h1), "127.0.0.1", 5432, "SELECT 1"), "1");
    let mut amb1 = amb1;
    let mut amb2 = amb2;
    for a in [&mut amb1, &mut amb2] {
        assert!(a.exited().is_none(), "{} stopped:\n{}", a.name, a.log());
        assert_eq!(a.log().matches("ready forwards=").count(), 1, "{}", a.log());
        assert!(!a.log().contains("WARN"), "{} warned:\n{}", a.name, a.log());
    }
    assert_eq!(
        (amb1.pid(), amb2.pid()),
        pids,
        "an ambassador was restarted"
    );
    drop(redis_b);
    drop(pg_b);

    let mut row = String::new();
    let _ = write!(
        row,
        "| {} | {} ({} runs, {:.0} SET/s, {:.0} GET/s) | {} ({} runs, {:.0} tps) | {} ({}) | {:.2} s (deregistered at {:.2} s) |",
        figures.redis_errors,
        figures.redis_requests,
        figures.redis_runs,
        figures.set_rps,
        figures.get_rps,
        figures.pg_tx,
        figures.pg_runs,
        figures.tps,
        figures.fresh_failures,
        figures.fresh,
        move_time.as_secs_f64(),
        deregistered.as_secs_f64(),
    );
    eprintln!(
        "| redis errors | redis requests | pgbench transactions | fresh failures (of) | move |\n{row}"
    );
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("discovery-chain-numbers.md");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        use std::io::Write as _;
        let _ = writeln!(f, "{row}");
    }
    drop(etcd);
}

#[derive(Default)]
struct Figures {
    redis_runs: u32,
    redis_requests: u64,
    redis_errors: u64,
    set_rps: f64,
    get_rps: f64,
    pg_runs: u32,
    pg_tx: u64,
    tps: f64,
    fresh: u64,
    fresh_failures: u64,
}

/// Three loops from host1 through ambassador1: redis-benchmark runs, pgbench runs, and fresh
/// connections doing PING and `SELECT 1`. Each runs until `moved` and then once more (at most
/// [`MAX_RUNS`] runs).
struct Loads {
    runs: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Figures>>,
}

impl Loads {
    fn start(h1: &str, moved: &Arc<AtomicBool>) -> Loads {
        let runs = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        {
            let (h1, moved, runs) = (h1.to_string(), moved.clone(), runs.clone());
            threads.push(std::thread::spawn(move || {
                let mut f = Figures::default();
                until(&moved, &runs, || {
                    let out = run(
                        TwoHosts::cmd(&h1, "redis-benchmark")
                            .args(["-h", "127.0.0.1", "-p", "6379", "-n", RB_REQUESTS])
                            .args(["-c", "4", "-k", "0", "-d", "64", "-t", "set,get"])
                            .arg("--csv"),
                        None,
                        CLIENT,
                    );
                    let text = format!("{}{}", out.stdout_str(), out.stderr);
                    let mut rows = 0;
                    for line in out.stdout_str().lines() {
                        let cols: Vec<&str> =
                            line.split(',').map(|c| c.trim_matches('"')).collect();
                        match (cols.first(), cols.get(1).and_then(|v| v.parse().ok())) {
                            (Some(&"SET"), Some(v)) => (f.set_rps, rows) = (v, rows + 1),
                            (Some(&"GET"), Some(v)) => (f.get_rps, rows) = (v, rows + 1),
                            _ => {}
                        }
                    }
                    let failed =
                        !out.status.success() || rows != 2 || text.to_lowercase().contains("error");
                    if failed {
                        eprintln!("redis-benchmark run failed:\n{text}");
                        f.redis_errors += 1;
                    }
                    f.redis_runs += 1;
                    f.redis_requests += 2 * RB_REQUESTS.parse::<u64>().unwrap();
                });
                f
            }));
        }
        {
            let (h1, moved, runs) = (h1.to_string(), moved.clone(), runs.clone());
            threads.push(std::thread::spawn(move || {
                let mut f = Figures::default();
                until(&moved, &runs, || {
                    // Fails the test unless every transaction completed.
                    f.tps = pgbench(
                        Some(&h1),
                        "127.0.0.1",
                        5432,
                        &["-C", "-c", "2", "-j", "2", "-t", PG_TX],
                    );
                    f.pg_runs += 1;
                    f.pg_tx += 2 * PG_TX.parse::<u64>().unwrap();
                });
                f
            }));
        }
        {
            let (h1, moved, runs) = (h1.to_string(), moved.clone(), runs.clone());
            threads.push(std::thread::spawn(move || {
                let mut f = Figures::default();
                until(&moved, &runs, || {
                    let fresh = in_ns(&h1, || {
                        let mut fails = 0;
                        for _ in 0..20 {
                            let pong = TcpStream::connect("127.0.0.1:6379").and_then(|mut c| {
                                c.set_read_timeout(Some(Duration::from_secs(10)))?;
                                redis::try_command(&mut c, &["PING"])
                            });
                            if pong.as_deref().ok() != Some("+PONG") {
                                eprintln!("fresh PING failed: {pong:?}");
                                fails += 1;
                            }
                        }
                        fails
                    });
                    f.fresh += 20;
                    f.fresh_failures += fresh;
                    let sel = run(
                        pg_tool(Some(&h1), "psql", "127.0.0.1", 5432)
                            .args(["-X", "-At", "-c", "SELECT 1"]),
                        None,
                        CLIENT,
                    );
                    f.fresh += 1;
                    if !sel.status.success() || sel.stdout_str().trim() != "1" {
                        eprintln!("fresh SELECT 1 failed: {}", sel.stderr);
                        f.fresh_failures += 1;
                    }
                });
                f
            }));
        }
        Loads { runs, threads }
    }

    fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }

    fn join(self) -> Figures {
        let mut t = Figures::default();
        for h in self.threads {
            let f = h.join().expect("a load loop failed");
            t.redis_runs += f.redis_runs;
            t.redis_requests += f.redis_requests;
            t.redis_errors += f.redis_errors;
            t.set_rps = t.set_rps.max(f.set_rps);
            t.get_rps = t.get_rps.max(f.get_rps);
            t.pg_runs += f.pg_runs;
            t.pg_tx += f.pg_tx;
            t.tps = t.tps.max(f.tps);
            t.fresh += f.fresh;
            t.fresh_failures += f.fresh_failures;
        }
        t
    }
}

/// Run `each` until `moved` and then once more; panics after [`MAX_RUNS`] runs.
fn until(moved: &AtomicBool, runs: &AtomicU64, mut each: impl FnMut()) {
    let mut after = false;
    for _ in 0..MAX_RUNS {
        each();
        runs.fetch_add(1, Ordering::SeqCst);
        if after {
            return;
        }
        after = moved.load(Ordering::SeqCst);
    }
    panic!("the move did not end within {MAX_RUNS} load runs");
}

/// A one-member etcd in `ns`, serving clients on `addr:2379` (peers on its loopback).
fn etcd(ns: &str, addr: Ipv4Addr, dir: &Path) -> Daemon {
    let client = format!("http://{addr}:{ETCD}");
    let peer = "http://127.0.0.1:2380";
    let mut d = Daemon::spawn(
        "etcd",
        TwoHosts::cmd(ns, "etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", peer])
            .args(["--initial-advertise-peer-urls", peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--log-level", "error", "--logger", "zap"]),
    );
    let up = poll(START, || {
        let o = run(
            TwoHosts::cmd(ns, "etcdctl").env("ETCDCTL_API", "3").args([
                &format!("--endpoints={client}"),
                "endpoint",
                "health",
            ]),
            None,
            CLIENT,
        );
        o.status.success().then_some(())
    });
    if up.is_none() {
        panic!("etcd did not start:\n{}", d.log());
    }
    assert!(d.exited().is_none());
    d
}

/// `ambassador register` in `ns`, waited for until it logged `registered`.
fn register(ns: &str, etcd: &str, service: &str, address: &str) -> Daemon {
    let mut cmd = TwoHosts::cmd(ns, ambassador_bin());
    cmd.env_clear()
        .env("RUST_LOG", "info")
        .args(["register", "--etcd", etcd, "--service", service])
        .args(["--address", address, "--ttl", "10s"]);
    let mut d = Daemon::spawn(&format!("register {service} {address}"), &mut cmd);
    d.wait_for("registered", START);
    d
}

/// An ambassador in `ns` with `--forward LISTEN=URL` per entry, on epoll, ready.
fn ambassador(ns: &str, name: &str, forwards: &[(&str, String)]) -> Daemon {
    let mut cmd = TwoHosts::cmd(ns, ambassador_bin());
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("RUST_LOG", "info")
        .args(["--mode", "epoll", "--drain-timeout", "2s"]);
    for (listen, url) in forwards {
        cmd.arg("--forward").arg(format!("{listen}={url}"));
    }
    let mut d = Daemon::spawn(name, &mut cmd);
    d.wait_for(&format!("ready forwards={}", forwards.len()), START);
    d
}

fn wait_log(d: &Daemon, needle: &str) {
    assert!(
        poll(CLIENT, || d.log().contains(needle).then_some(())).is_some(),
        "{} never logged {needle:?}:\n{}",
        d.name,
        d.log()
    );
}

/// One numeric field of `INFO` from the redis at `addr:port`.
fn redis_info(ns: &str, addr: Ipv4Addr, port: u16, field: &str) -> u64 {
    let out = ok(
        redis_cli(ns, &addr.to_string(), port).args(["INFO", "clients"]),
        None,
        CLIENT,
    )
    .stdout_str();
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in {out}"))
}
