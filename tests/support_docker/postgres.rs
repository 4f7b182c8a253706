//! A throwaway PostgreSQL cluster and its client tools, on loopback or inside one of the
//! [`TwoHosts`](super::netns::TwoHosts) namespaces.
//!
//! [`Postgres::start`] runs `initdb` as user `postgres` (it refuses root) into a fresh directory
//! and starts the server with durability off (it is not what is measured). [`pgbench`] runs a
//! bounded TPC-B-like load and fails the test unless every transaction completed.

use super::netns::TwoHosts;
use super::{Daemon, ok, run};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const START: Duration = Duration::from_secs(30);
const TOOL: Duration = Duration::from_secs(60);

/// `prog` on the host (`ns` = None) or inside network namespace `ns`.
pub fn cmd_in(ns: Option<&str>, prog: impl AsRef<std::ffi::OsStr>) -> Command {
    match ns {
        Some(ns) => TwoHosts::cmd(ns, prog),
        None => Command::new(prog),
    }
}

/// A running cluster; stopped (fast shutdown), then its files removed, on drop.
pub struct Postgres {
    // Field order is drop order: the server stops before its directory goes.
    _daemon: Daemon,
    _dir: TempDir,
    pub port: u16,
}

impl Postgres {
    /// A cluster listening on `addr:port` that trusts loopback and, if given, the `trust`
    /// subnet (e.g. `10.200.1.0/24`).
    pub fn start(ns: Option<&str>, addr: Ipv4Addr, port: u16, trust: Option<&str>) -> Postgres {
        let dir = TempDir::new("amb-pg-");
        let data = dir.0.join("pgdata");
        let as_postgres = |prog: PathBuf| {
            let mut c = cmd_in(ns, "setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"])
                .arg(prog)
                .current_dir(&dir.0);
            c
        };
        ok(
            as_postgres(pg_bin("initdb"))
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8"])
                .args(["--locale=C", "--no-sync", "-D"])
                .arg(&data),
            None,
            TOOL,
        );
        if let Some(net) = trust {
            let mut hba = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))
                .unwrap();
            writeln!(hba, "host all all {net} trust").unwrap();
        }
        let mut pg = as_postgres(pg_bin("postgres"));
        pg.arg("-D").arg(&data).arg("-k").arg(&dir.0);
        pg.args(["-p", &port.to_string()])
            .args(["-c", &format!("listen_addresses={addr}")]);
        pg.args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"]);
        let mut d = Daemon::spawn(&format!("postgres :{port}"), &mut pg);
        // Fast shutdown: roll back and stop backends, then the postmaster.
        d.stop_signal = libc::SIGINT;
        d.wait_for("ready to accept connections", START);
        Postgres {
            _daemon: d,
            _dir: dir,
            port,
        }
    }
}

/// The newest installed PostgreSQL's `prog` (/usr/lib/postgresql/<major>/bin/<prog>).
pub fn pg_bin(prog: &str) -> PathBuf {
    let mut majors: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("postgresql not installed")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    majors.sort();
    let major = majors
        .last()
        .expect("no PostgreSQL version under /usr/lib/postgresql");
    PathBuf::from(format!("/usr/lib/postgresql/{major}/bin/{prog}"))
}

/// A client tool (`psql`, `pgbench`) aimed at `host:port` as user postgres.
pub fn pg_tool(ns: Option<&str>, prog: &str, host: &str, port: u16) -> Command {
    let mut c = cmd_in(ns, pg_bin(prog));
    c.args(["-h", host, "-p", &port.to_string(), "-U", "postgres"])
        .env("PGCONNECT_TIMEOUT", "5")
        .env("PGDATABASE", "postgres");
    c
}

/// `pgbench -n <args>` against `host:port`; fails unless it exits 0 with every transaction
/// processed. Returns the reported tps.
pub fn pgbench(ns: Option<&str>, host: &str, port: u16, args: &[&str]) -> f64 {
    let pb = run(
        pg_tool(ns, "pgbench", host, port)
            .arg("-n")
            .args(args)
            .arg("postgres"),
        None,
        TOOL,
    );
    let out = pb.stdout_str();
    assert!(pb.status.success(), "pgbench failed:\n{out}\n{}", pb.stderr);
    // "number of transactions actually processed: 1000/1000": every transaction completed.
    let processed = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "));
    let (done, asked) = processed
        .and_then(|p| p.split_once('/'))
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(done, asked.trim(), "pgbench lost transactions:\n{out}");
    out.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l["tps = ".len()..].split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench output:\n{out}"))
}

/// `psql -At -c <sql>` against `host:port`: the result's text, trimmed.
pub fn psql(ns: Option<&str>, host: &str, port: u16, sql: &str) -> String {
    ok(
        pg_tool(ns, "psql", host, port).args(["-At", "-c", sql]),
        None,
        TOOL,
    )
    .stdout_str()
    .trim()
    .to_string()
}

/// A directory owned by postgres (initdb refuses root), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let d = std::env::temp_dir().join(super::unique(prefix));
        std::fs::create_dir_all(&d).unwrap();
        let id = |flag: &str| -> u32 {
            ok(Command::new("id").args([flag, "postgres"]), None, TOOL)
                .stdout_str()
                .trim()
                .parse()
                .unwrap()
        };
        std::os::unix::fs::chown(&d, Some(id("-u")), Some(id("-g"))).unwrap();
        TempDir(d)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
