//! Harness for the end-to-end tests that drive real outside programs: Docker (`tests/docker.rs`)
//! and the two-host chain in network namespaces (`tests/chain.rs`).
//!
//! # Layout
//! - this file: running a program with a deadline ([`run`], [`ok`]), a long-running program
//!   whose log is kept and which is stopped when dropped ([`Daemon`]), Debian packages
//!   ([`apt_install`]), the ambassador binary under test ([`ambassador_bin`]), test data.
//! - [`docker`]: dockerd, images assembled from host binaries, containers removed on drop.
//! - [`netns`]: two "hosts" as network namespaces joined by a veth pair, removed on drop;
//!   running a closure inside one.
//! - [`postgres`], [`redis`]: the databases and their client tools, on loopback or in a host.
//!
//! It is a directory with `mod.rs` (not `support_docker.rs`) so that nothing directly in
//! `tests/` looks like a test target. Only std, libc and the shared test-support crate (its
//! bounded wait).
//!
//! Every outside program runs with a deadline, and everything started is undone by a `Drop`,
//! so a failing assertion still removes containers, namespaces and processes.

// Each test crate uses a different part of this module.
#![allow(dead_code)]

pub mod docker;
pub mod netns;
pub mod postgres;
pub mod redis;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a finished program left behind.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Run `cmd` to completion, feeding it `stdin`; kill it and panic if it takes longer than
/// `timeout`.
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {shown}: {e}"));
    let feeder = stdin.map(|data| {
        let mut pipe = child.stdin.take().unwrap();
        let data = data.to_vec();
        // A program that exits early closes the pipe; that is its business, not an error here.
        std::thread::spawn(move || drop(pipe.write_all(&data)))
    });
    let out = slurp(child.stdout.take().unwrap());
    let err = slurp(child.stderr.take().unwrap());
    let status = wait_deadline(&mut child, timeout)
        .unwrap_or_else(|| panic!("{shown} did not finish within {timeout:?}; killed"));
    if let Some(f) = feeder {
        let _ = f.join();
    }
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: String::from_utf8_lossy(&err.join().unwrap()).into_owned(),
    }
}

/// [`run`], and panic (showing stderr) unless the program exits 0.
pub fn ok(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let o = run(cmd, stdin, timeout);
    assert!(
        o.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        o.status,
        o.stderr,
        o.stdout_str()
    );
    o
}

fn slurp(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// Wait for `child` until `timeout`; on expiry SIGKILL it, reap it and return `None`.
fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let st = poll(timeout, || child.try_wait().expect("waitpid"));
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    st
}

/// Call `f` until it returns `Some`, for at most `timeout` (the shared bounded wait,
/// [`ambassador_test_support::poll`]).
pub fn poll<T>(timeout: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    ambassador_test_support::poll(timeout, "a condition", f).ok()
}

/// A long-running program (a server, an ambassador). Its stdout and stderr are collected into
/// one log; it is stopped with `stop_signal` (then SIGKILL after 5 s) when dropped, and its
/// log is printed if the test is failing.
pub struct Daemon {
    pub name: String,
    child: Child,
    log: Arc<Mutex<String>>,
    pub stop_signal: i32,
}

impl Daemon {
    pub fn spawn(name: &str, cmd: &mut Command) -> Daemon {
        let shown = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {shown}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut l = log.lock().unwrap();
                    l.push_str(&strip_ansi(&line));
                    l.push('\n');
                }
            });
        }
        Daemon {
            name: name.to_string(),
            child,
            log,
            stop_signal: libc::SIGTERM,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Has it exited? (Reaps it if so.)
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("waitpid")
    }

    /// Wait until the log contains `pat`; panic (with the log) on timeout or if it exits first.
    pub fn wait_for(&mut self, pat: &str, timeout: Duration) {
        let found = poll(timeout, || {
            if self.log().contains(pat) {
                return Some(true);
            }
            self.exited().map(|_| false)
        });
        match found {
            Some(true) => {}
            Some(false) => panic!(
                "{} exited before logging {pat:?}:\n{}",
                self.name,
                self.log()
            ),
            None => panic!(
                "{} did not log {pat:?} within {timeout:?}:\n{}",
                self.name,
                self.log()
            ),
        }
    }

    /// Send `sig` (e.g. SIGUSR1 for the stats lines).
    pub fn signal(&self, sig: i32) {
        // Safety: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Stop it with `stop_signal`, SIGKILL after `grace`; return the exit status and the log.
    pub fn stop(mut self, grace: Duration) -> (ExitStatus, String) {
        let st = self.halt(grace);
        (st, self.log())
    }

    fn halt(&mut self, grace: Duration) -> ExitStatus {
        if let Some(st) = self.exited() {
            return st;
        }
        self.signal(self.stop_signal);
        wait_deadline(&mut self.child, grace).unwrap_or_else(|| self.child.wait().unwrap())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.halt(Duration::from_secs(5));
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}-----", self.name, self.log());
        }
    }
}

/// `apt-get install` those of `pkgs` that dpkg does not list as installed (fresh machines).
pub fn apt_install(pkgs: &[&str]) {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| {
            let o = run(
                Command::new("dpkg-query").args(["-W", "-f=${Status}", p]),
                None,
                Duration::from_secs(30),
            );
            !o.stdout_str().contains("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        return;
    }
    let _lock = apt_lock();
    ok(
        Command::new("apt-get").args(["update", "-q"]),
        None,
        Duration::from_secs(300),
    );
    ok(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
        None,
        Duration::from_secs(600),
    );
}

/// Tests in one binary run on parallel threads; let one of them run apt at a time.
fn apt_lock() -> std::sync::MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

/// The binary under test: `$AMBASSADOR_BIN` if set (the team's known-good binary, see
/// docs/contract.md), else the one cargo built for this test run.
pub fn ambassador_bin() -> PathBuf {
    match std::env::var_os("AMBASSADOR_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_ambassador")),
    }
}

/// `n` bytes from a fixed xorshift stream (reproducible, incompressible, all 256 values).
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `n` bytes of `[0-9a-z]` (for text protocols that would escape other bytes).
pub fn random_text(n: usize, seed: u64) -> Vec<u8> {
    const ALPHA: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    random_bytes(n, seed)
        .into_iter()
        .map(|b| ALPHA[b as usize % ALPHA.len()])
        .collect()
}

/// `s` without ANSI colour sequences (`ESC [ ... letter`), in case a logger colours its fields.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            // Skip the '[' and parameters up to the final letter.
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `key=<value>` in a log line (values end at whitespace).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(pat.as_str()))
}

/// The engine named by the `engine chosen engine=<name>` line of an ambassador log.
pub fn chosen_engine(log: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("engine chosen"))
        .and_then(|l| field(l, "engine"))
        .map(|e| e.trim_matches('"').to_string())
}

/// A name unique to this test process and call (for containers, namespaces, temp dirs).
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
