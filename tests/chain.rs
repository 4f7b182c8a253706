//! The 2014 two-host ambassador walkthrough, with network namespaces as the hosts:
//!
//! ```text
//!   host1 (netns)                                   host2 (netns)
//!   app ── 127.0.0.1:6379/5432 ── ambassador1 ──veth── ambassador2 :6379/:5432 ── redis :16379
//!   (redis-cli, redis-benchmark,   REDIS_PORT_6379_TCP=  10.200.1.2  REDIS_PORT_6379_TCP=  postgres :15432
//!    psql, pgbench)                tcp://10.200.1.2:6379             tcp://10.200.1.2:16379
//! ```
//!
//! Both ambassadors are configured only by classic link variables. The app side does byte-exact
//! round trips (redis and PostgreSQL) and a short bounded redis-benchmark and pgbench run, also
//! run directly against the databases for comparison. Then the db moves: a second redis starts
//! on another port, only ambassador2 is restarted with the new target, and the unchanged app
//! finds a key that exists only in the new db. Once per engine and once mixed.
//!
//! Needs root (namespaces). Traffic stays inside the two namespaces the test creates; they, the
//! databases and the ambassadors are removed even when an assertion fails.

mod support_docker;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;
use support_docker::netns::{TwoHosts, namespaces, pids};
use support_docker::postgres::{Postgres, TempDir, pg_tool, pgbench};
use support_docker::redis::{redis_cli, redis_server};
use support_docker::{
    Daemon, ambassador_bin, apt_install, chosen_engine, field, ok, poll, random_bytes, random_text,
};

const REDIS_A: u16 = 16379;
const REDIS_B: u16 = 16380;
const PG: u16 = 15432;
const START: Duration = Duration::from_secs(30);
const CLIENT: Duration = Duration::from_secs(60);

/// redis-benchmark: requests per client run (count bound; CLIENT is the time bound).
const BENCH_REQUESTS: &str = "20000";
/// pgbench: transactions per client, 4 clients.
const PG_TX: &str = "250";

#[test]
fn chain_sockmap() {
    chain("sockmap", "sockmap");
}

#[test]
fn chain_uring() {
    chain("uring", "uring");
}

#[test]
fn chain_epoll() {
    chain("epoll", "epoll");
}

/// The lab is a guard: a test that panics inside it leaves no namespace behind (and so no veth
/// pair, whose ends live in them), nor any process it started there.
#[test]
fn a_panicking_test_leaves_no_namespace() {
    apt_install(&["iproute2"]);
    let made = std::sync::Mutex::new(Vec::new());
    let pid = std::sync::Mutex::new(0);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = TwoHosts::new();
        *made.lock().unwrap() = vec![lab.host1.clone(), lab.host2.clone()];
        let listed = namespaces();
        assert!(
            listed.contains(&lab.host1) && listed.contains(&lab.host2),
            "{listed:?}"
        );
        // A straggler whose own guard is leaked: the lab must kill it to remove its namespace.
        let sleeper = Daemon::spawn("sleep", TwoHosts::cmd(&lab.host2, "sleep").arg("600"));
        *pid.lock().unwrap() = sleeper.pid();
        let inside = poll(START, || {
            pids(&lab.host2).contains(&sleeper.pid()).then_some(())
        });
        assert!(inside.is_some(), "sleep never ran inside {}", lab.host2);
        std::mem::forget(sleeper);
        panic!("on purpose, inside the lab");
    }));
    assert!(r.is_err(), "the closure panicked");
    let made = made.into_inner().unwrap();
    assert_eq!(made.len(), 2);
    let left = namespaces();
    for ns in &made {
        assert!(!left.contains(ns), "{ns} outlived the panic: {left:?}");
        assert!(
            !Path::new("/var/run/netns").join(ns).exists(),
            "{ns}'s mount"
        );
    }
    // Killed: gone, or a zombie nobody reaps (its guard was leaked).
    let pid = pid.into_inner().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
    assert!(
        matches!(state, None | Some('Z')),
        "pid {pid} still runs: {stat}"
    );
}

/// Engines need not match across hosts: the in-kernel splice on host1, epoll on host2.
#[test]
fn chain_mixed() {
    chain("sockmap", "epoll");
}

fn chain(engine1: &str, engine2: &str) {
    apt_install(&[
        "redis-server",
        "redis-tools",
        "postgresql",
        "iproute2",
        "util-linux",
    ]);
    let lab = TwoHosts::new();
    let (h1, h2, a2) = (lab.host1.as_str(), lab.host2.as_str(), lab.addr2);
    let tmp = TempDir::new("amb-chain-");
    let _redis_a = redis_server(h2, a2, REDIS_A, &tmp.0);
    let _pg = Postgres::start(Some(h2), a2, PG, Some("10.200.1.0/24"));
    ok(
        pg_tool(Some(h1), "pgbench", &a2.to_string(), PG).args(["-i", "-q", "-s", "1"]),
        None,
        CLIENT,
    );

    // The same app-side runs without ambassadors, for the numbers table.
    let direct = bench(h1, &a2.to_string(), REDIS_A, PG);

    let remote = |port: u16| format!("tcp://{a2}:{port}");
    let mut amb2 = ambassador(
        h2,
        "ambassador2",
        engine2,
        &[
            ("REDIS_PORT_6379_TCP", remote(REDIS_A)),
            ("PG_PORT_5432_TCP", remote(PG)),
        ],
    );
    let mut amb1 = ambassador(
        h1,
        "ambassador1",
        engine1,
        &[
            ("REDIS_PORT_6379_TCP", remote(6379)),
            ("PG_PORT_5432_TCP", remote(5432)),
        ],
    );

    // The app talks to "its" local ambassador only.
    redis_round_trip(h1, "127.0.0.1", 6379, "chain-big", 11);
    pg_round_trip(h1, "127.0.0.1", 5432, "chain_blob", 12);
    let through = bench(h1, "127.0.0.1", 6379, 5432);
    for a in [&amb1, &amb2] {
        a.signal(libc::SIGUSR1);
    }
    for a in [&amb1, &amb2] {
        let stats = poll(Duration::from_secs(5), || {
            let log = a.log();
            let n = log
                .lines()
                .filter(|l| l.contains("stats") && l.contains("forward="))
                .count();
            (n >= 2).then_some(log)
        })
        .unwrap_or_else(|| panic!("{} logged no stats on SIGUSR1:\n{}", a.name, a.log()));
        for l in stats.lines().filter(|l| l.contains("stats")) {
            let conns: u64 = field(l, "conns_total")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            assert!(conns > 0, "{}: a forward saw no connection: {l}", a.name);
            // The in-kernel engine must really splice, not quietly copy in userspace.
            if chosen_engine(&stats).as_deref() == Some("sockmap") {
                let spliced: u64 = field(l, "spliced_to_upstream")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                assert!(spliced > 0, "{}: sockmap spliced nothing: {l}", a.name);
            }
            eprintln!("{}: {l}", a.name);
        }
    }

    // Move the db: a new redis elsewhere on host2 holding a key the old one lacks; restart only
    // ambassador2, pointed at it.
    let _redis_b = redis_server(h2, a2, REDIS_B, &tmp.0);
    let marker = random_text(64, 13);
    let set = ok(
        redis_cli(h2, &a2.to_string(), REDIS_B)
            .args(["SET", "only-in-new-db"])
            .arg(os(&marker)),
        None,
        CLIENT,
    );
    assert_eq!(set.stdout_str().trim(), "OK");
    let (status, log) = amb2.stop(Duration::from_secs(10));
    assert!(
        status.success(),
        "ambassador2 did not exit 0 on SIGTERM ({status}):\n{log}"
    );
    amb2 = ambassador(
        h2,
        "ambassador2 (moved)",
        engine2,
        &[
            ("REDIS_PORT_6379_TCP", remote(REDIS_B)),
            ("PG_PORT_5432_TCP", remote(PG)),
        ],
    );

    // The app is unchanged and so is ambassador1 (the same process).
    assert!(
        amb1.exited().is_none(),
        "ambassador1 stopped:\n{}",
        amb1.log()
    );
    let get = |key: &str| {
        ok(
            redis_cli(h1, "127.0.0.1", 6379).args(["GET", key]),
            None,
            CLIENT,
        )
        .stdout
    };
    assert_eq!(
        get("only-in-new-db"),
        [&marker[..], b"\n"].concat(),
        "the app did not reach the new db"
    );
    assert_eq!(get("chain-big"), b"\n", "the app still reaches the old db");
    redis_round_trip(h1, "127.0.0.1", 6379, "after-move", 14);
    pg_round_trip(h1, "127.0.0.1", 5432, "after_move_blob", 15);
    drop(amb2);

    record(engine1, engine2, &direct, &through);
}

/// The ambassador in namespace `ns`, with an environment holding only PATH, RUST_LOG and
/// `vars` (so no stray `*_PORT_*_TCP` of the test's own environment becomes a forward); waits
/// for `ready` and checks the log names the requested engine.
fn ambassador(ns: &str, name: &str, mode: &str, vars: &[(&str, String)]) -> Daemon {
    let mut cmd = TwoHosts::cmd(ns, ambassador_bin());
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("RUST_LOG", "info");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.args(["--mode", mode, "--drain-timeout", "2s"]);
    let mut d = Daemon::spawn(name, &mut cmd);
    d.wait_for(&format!("ready forwards={}", vars.len()), START);
    assert_eq!(
        chosen_engine(&d.log()).as_deref(),
        Some(mode),
        "{name}:\n{}",
        d.log()
    );
    d
}

/// SET a 1 MiB random binary value and GET it back byte-exact.
fn redis_round_trip(ns: &str, host: &str, port: u16, key: &str, seed: u64) {
    let value = random_bytes(1 << 20, seed);
    let set = ok(
        redis_cli(ns, host, port).args(["-x", "SET", key]),
        Some(&value),
        CLIENT,
    );
    assert_eq!(set.stdout_str().trim(), "OK", "{}", set.stderr);
    let got = ok(redis_cli(ns, host, port).args(["GET", key]), None, CLIENT).stdout;
    assert_eq!(got.len(), value.len() + 1, "GET {key}: {} bytes", got.len());
    assert!(
        got[..value.len()] == value[..],
        "GET {key} is not byte-exact"
    );
}

/// COPY a 1 MiB text value into a new table and SELECT it back byte-exact.
fn pg_round_trip(ns: &str, host: &str, port: u16, table: &str, seed: u64) {
    let value = random_text(1 << 20, seed);
    let psql = |sql: &str, stdin: Option<&[u8]>| {
        let mut c = pg_tool(Some(ns), "psql", host, port);
        c.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
            "postgres",
        ]);
        ok(&mut c, stdin, CLIENT).stdout
    };
    psql(&format!("CREATE TABLE {table} (v text)"), None);
    psql(
        &format!("COPY {table} (v) FROM STDIN"),
        Some(&[&value[..], b"\n"].concat()),
    );
    let got = psql(&format!("SELECT v FROM {table}"), None);
    assert_eq!(
        got.len(),
        value.len() + 1,
        "SELECT from {table}: {} bytes",
        got.len()
    );
    assert!(
        got[..value.len()] == value[..],
        "SELECT from {table} is not byte-exact"
    );
}

#[derive(Default)]
struct Numbers {
    set_rps: f64,
    get_rps: f64,
    tps: f64,
}

/// A short bounded redis-benchmark (SET, GET) and pgbench (TPC-B-like, 4 clients) run from
/// host1 against the given endpoints.
fn bench(ns: &str, host: &str, redis_port: u16, pg_port: u16) -> Numbers {
    let mut n = Numbers::default();
    let rb = ok(
        TwoHosts::cmd(ns, "redis-benchmark")
            .args(["-h", host, "-p", &redis_port.to_string()])
            .args([
                "-n",
                BENCH_REQUESTS,
                "-c",
                "16",
                "-d",
                "256",
                "-t",
                "set,get",
                "--csv",
            ]),
        None,
        CLIENT,
    )
    .stdout_str();
    for line in rb.lines() {
        let cols: Vec<&str> = line.split(',').map(|c| c.trim_matches('"')).collect();
        match (
            cols.first(),
            cols.get(1).and_then(|v| v.parse::<f64>().ok()),
        ) {
            (Some(&"SET"), Some(v)) => n.set_rps = v,
            (Some(&"GET"), Some(v)) => n.get_rps = v,
            _ => {}
        }
    }
    assert!(
        n.set_rps > 0.0 && n.get_rps > 0.0,
        "redis-benchmark output without SET/GET:\n{rb}"
    );
    n.tps = pgbench(
        Some(ns),
        host,
        pg_port,
        &["-c", "4", "-j", "2", "-t", PG_TX],
    );
    n
}

/// Append this run's numbers to `target/tmp/chain-numbers.md` (and show them).
fn record(engine1: &str, engine2: &str, direct: &Numbers, through: &Numbers) {
    let mut row = String::new();
    let _ = write!(
        row,
        "| {engine1} → {engine2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
        direct.set_rps, through.set_rps, direct.get_rps, through.get_rps, direct.tps, through.tps
    );
    eprintln!(
        "| host1 → host2 engines | SET direct | SET chain | GET direct | GET chain | TPS direct | TPS chain |\n{row}"
    );
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chain-numbers.md");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        let _ = writeln!(f, "{row}");
    }
}

fn os(b: &[u8]) -> &std::ffi::OsStr {
    std::os::unix::ffi::OsStrExt::from_bytes(b)
}
