//! Test support: start the real `ambassador` binary, pick ports, make and
//! check deterministic byte streams, and run small real servers in threads.
//! Everything talks to loopback only and every wait is bounded.
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_ambassador");

pub use ambassador_test_support::free_port;
#[allow(unused_imports)] // each test binary uses some of them
pub use ambassador_test_support::stream::{Stream, check_stream, send_stream};

/// Run `ambassador <args>` to completion with exactly `env` (nothing of the
/// test's own environment): (exit code, -1 if killed by a signal; stdout; stderr).
pub fn run_with_env(env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run ambassador");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running ambassador. Killed on drop; its log is kept for assertions.
pub struct Proxy {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    pub port: u16,
    /// Set once the log reader saw the end of stderr: the log is complete.
    log_done: Arc<AtomicBool>,
}

impl Proxy {
    /// `ambassador --mode <mode> --forward 127.0.0.1:<port>=<target> <extra>`, waiting for `ready`.
    pub fn forward(mode: &str, target: &str, extra: &[&str]) -> Proxy {
        let port = free_port();
        let fwd = format!("127.0.0.1:{port}={target}");
        // `sockmap` splices every connection; `sockmap_adaptive` is the
        // default policy (userspace first, spliced once request/response).
        let mut args = match mode {
            "sockmap" => vec!["--mode", "sockmap", "--splice", "always"],
            "sockmap_adaptive" => vec!["--mode", "sockmap", "--splice", "adaptive"],
            _ => vec!["--mode", mode],
        };
        args.extend(["--forward", fwd.as_str()]);
        args.extend_from_slice(extra);
        let mut cmd = Command::new(BIN);
        cmd.args(&args).env_clear();
        if mode == "sockmap_adaptive" {
            // Promote at the first quiet point instead of after 4 round
            // trips, so most of these tests run through a promotion.
            cmd.env("AMBASSADOR_SOCKMAP_PROMOTE_TURNS", "0");
        }
        Proxy::spawn(cmd, port).expect("proxy did not become ready")
    }

    /// Spawn `cmd` (stderr captured) and wait up to 10 s for the `ready` line.
    /// Err carries the log if the process exited first.
    pub fn spawn(mut cmd: Command, port: u16) -> Result<Proxy, (Option<i32>, String)> {
        cmd.env(
            "RUST_LOG",
            std::env::var("AMB_TEST_LOG").unwrap_or("debug".into()),
        );
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ambassador");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        let log_done = Arc::new(AtomicBool::new(false));
        let done2 = log_done.clone();
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(" ready ") || line.contains("\"ready\"") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
            done2.store(true, Ordering::SeqCst);
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => Ok(Proxy {
                child,
                log,
                port,
                log_done,
            }),
            Err(_) => {
                let code = match child.try_wait() {
                    Ok(Some(st)) => st.code(),
                    _ => {
                        let _ = child.kill();
                        child.wait().ok().and_then(|s| s.code())
                    }
                };
                // The process is gone: wait (bounded) for the reader to reach the end of its log.
                wait_until(5, || log_done.load(Ordering::SeqCst));
                let l = log.lock().unwrap().clone();
                Err((code, l))
            }
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr()).expect("connect to proxy");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Wait for the log to contain `needle` (up to `secs`).
    pub fn wait_log(&self, needle: &str, secs: u64) -> bool {
        wait_until(secs, || self.log().contains(needle))
    }

    /// Wait for a log line that contains every one of `parts` (up to `secs`).
    pub fn wait_line(&self, parts: &[&str], secs: u64) -> bool {
        wait_until(secs, || {
            self.log()
                .lines()
                .any(|l| parts.iter().all(|p| l.contains(p)))
        })
    }

    /// SIGUSR1, then wait (bounded) for the `stats` line it logs: [`Proxy::stat`]
    /// reads the counters of that moment afterwards. False if none came.
    #[allow(dead_code)] // each test binary uses some of them
    pub fn stats_now(&self) -> bool {
        let seen = self.log_count(" stats ");
        self.signal(libc::SIGUSR1);
        wait_until(10, || self.log_count(" stats ") > seen)
    }

    /// How many times `needle` occurs in the log.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Open file descriptors of the process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// A `Status:`-style line of /proc/<pid>/status, e.g. `CapEff`.
    pub fn status_field(&self, field: &str) -> Option<String> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        s.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .map(|v| v.trim().to_string())
    }

    /// Wait for exit (up to `secs`), returning the exit code.
    /// The log is then complete (the reader saw the end of stderr, waited for up to 5 s more).
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let mut code = None;
        if !wait_until(secs, || match self.child.try_wait() {
            Ok(Some(st)) => {
                code = st.code();
                true
            }
            _ => false,
        }) {
            return None;
        }
        wait_until(5, || self.log_done.load(Ordering::SeqCst));
        code
    }

    /// The last `stats` line's value for `key` (after SIGUSR1 or exit).
    pub fn stat(&self, key: &str) -> Option<u64> {
        self.stat_for("", key)
    }

    /// The last `stats` line of the forward whose source is `forward` (any,
    /// if empty): its value for `key`.
    pub fn stat_for(&self, forward: &str, key: &str) -> Option<u64> {
        let log = self.log();
        ambassador_test_support::stat(ambassador_test_support::stats_line(&log, forward)?, key)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A threaded server on 127.0.0.1: `handler` runs for each accepted
/// connection on its own thread. Returns the port and a count of accepts.
pub fn serve<F>(handler: F) -> (u16, Arc<std::sync::atomic::AtomicUsize>)
where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    // A backlog of 1024, not std's 128: a burst of connects (500 at once
    // through several workers) must not overflow it into SYN cookies,
    // whose failures reset connections on the server's side.
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    l.listen(1024).unwrap();
    let l: TcpListener = l.into();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acc = accepted.clone();
    let handler = Arc::new(handler);
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            acc.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let h = handler.clone();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            thread::spawn(move || h(s));
        }
    });
    (port, accepted)
}

/// An echo server: returns everything, then closes when the client does.
pub fn echo_server() -> u16 {
    serve(|mut s| {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = s.shutdown(Shutdown::Write);
    })
    .0
}

/// Close with RST instead of FIN.
pub fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

/// Engines whose start-up works on this machine, for per-engine tests.
pub fn engine_available(mode: &str) -> bool {
    let port = free_port();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--mode",
        mode,
        "--forward",
        &format!("127.0.0.1:{port}=127.0.0.1:9"),
    ]);
    match Proxy::spawn(cmd, port) {
        Ok(_) => true,
        Err((_, log)) => {
            eprintln!("engine {mode} unavailable: {log}");
            false
        }
    }
}

/// Restrict a child before exec: drop every capability and/or make
/// io_uring_setup fail with EPERM through a seccomp filter, the way Docker's
/// default profile does. Only the child is affected; no global sysctl.
pub fn restrict(cmd: &mut Command, drop_caps: bool, deny_io_uring: bool) {
    use std::os::unix::process::CommandExt;
    // Built before fork: the closure only makes syscalls.
    let filter = deny_io_uring.then(|| {
        ambassador_test_support::seccomp::deny(&[libc::SYS_io_uring_setup]).expect("seccomp filter")
    });
    unsafe {
        cmd.pre_exec(move || {
            if drop_caps {
                // As root, exec gives the full set back unless SECBIT_NOROOT
                // is set, which needs CAP_SETPCAP: set (and lock) it first,
                // then empty every set.
                const SECBIT_NOROOT: libc::c_ulong = 1;
                const SECBIT_NOROOT_LOCKED: libc::c_ulong = 2;
                if libc::prctl(
                    libc::PR_SET_SECUREBITS,
                    SECBIT_NOROOT | SECBIT_NOROOT_LOCKED,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                #[repr(C)]
                struct Header {
                    version: u32,
                    pid: i32,
                }
                let mut h = Header {
                    version: 0x2008_0522,
                    pid: 0,
                };
                let data = [0u32; 6];
                if libc::syscall(libc::SYS_capset, &mut h, data.as_ptr()) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(f) = &filter {
                f.apply()?;
            }
            Ok(())
        });
    }
}

/// Poll `cond` for up to `secs` seconds (and once more at the end): whether
/// it became true. The shared bounded wait (`ambassador_test_support::wait`)
/// in whole seconds; every wait in the tests goes through it.
pub fn wait_until(secs: u64, cond: impl FnMut() -> bool) -> bool {
    ambassador_test_support::wait_until(Duration::from_secs(secs), cond)
}
